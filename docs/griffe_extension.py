"""A griffe extension for the API page (mkdocs.yml loads it): the docstrings are written for
``help()`` and the source, in reST roles and Google-style sections; this makes them render.

- A role, :func:`~sce_loss.x` or :class:`MemoryQueue`, becomes a link to the object's entry on the
  API page when it has one, else inline code: ``~`` keeps the last name only, as in Sphinx.
- Every parameter of a public function, class (its ``__init__``) or method gets a row of its own
  in the parameter table, in the signature's order. A parameter without a row takes, in this
  order: the part of another row from ``name:`` on (two parameters described in one row); the row
  of a function the docstring refers to (``Other arguments as :func:`info_nce_loss```); the clause
  of the text that names it in double backticks. Those left without a description are listed in
  ``UNDESCRIBED`` (tests/test_docs.py reads it), with an empty row.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

PACKAGE = "sce_loss"
ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`(?P<tilde>~?)(?P<target>[\w.]+)`")
UNDESCRIBED: dict[str, list[str]] = {}


class ReSTForMkdocstrings(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != PACKAGE:
            return
        public = {name: pkg[name] for name in pkg.members if name in _exports(pkg)}
        references: dict[str, list[griffe.Object]] = {}
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value, references[obj.path] = _links(obj, pkg, public)
        for documented in _documented(public):
            _complete_parameters(documented, references)


def _exports(pkg: griffe.Module) -> set[str]:
    """The names in the package's ``__all__``: the objects with an entry on the API page."""
    names = pkg.members["__all__"].value
    return {str(name).strip("'\"") for name in getattr(names, "elements", [])}


def _objects(module: griffe.Module):
    """Every module, class and function of the package (not aliases), depth first."""
    yield module
    for member in module.members.values():
        if member.is_alias:
            continue
        if member.is_module:
            yield from _objects(member)
        elif member.is_class:
            yield member
            yield from (m for m in member.members.values() if not m.is_alias and m.is_function)
        elif member.is_function:
            yield member


def _links(obj: griffe.Object, pkg: griffe.Module, public: dict) -> tuple[str, list]:
    """The docstring with its roles rewritten, and the public objects it refers to."""
    referred = []

    def replace(match: re.Match) -> str:
        target = match["target"]
        shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
        name = _public_name(target, obj, public)
        if name is None:
            return f"`{shown}`"
        referred.append(public[name].final_target if public[name].is_alias else public[name])
        return f"[`{shown}`][{PACKAGE}.{name}]"

    return ROLE.sub(replace, obj.docstring.value), referred


def _public_name(target: str, obj: griffe.Object, public: dict) -> str | None:
    """The name in ``__all__`` that ``target`` (absolute, or relative to ``obj``'s module) is."""
    last = target.rsplit(".", 1)[-1]
    if last not in public:
        return None
    item = public[last]
    canonical = item.final_target.path if item.is_alias else item.path
    candidates = {f"{PACKAGE}.{target}", target, f"{obj.module.path}.{target}"}
    return last if candidates & {canonical, f"{PACKAGE}.{last}"} else None


def _documented(public: dict):
    """The rendered objects that take parameters: functions, classes, and classes' methods with a
    docstring (mkdocstrings shows those)."""
    for item in public.values():
        item = item.final_target if item.is_alias else item
        yield item
        if item.is_class:
            yield from (
                m
                for name, m in item.members.items()
                if m.is_function and not name.startswith("_") and m.docstring is not None
            )


def _complete_parameters(obj: griffe.Object, references: dict) -> None:
    if obj.docstring is None:
        return
    signature = [
        p
        for p in obj.parameters
        if p.name != "self" and p.kind.name not in ("var_positional", "var_keyword")
    ]
    sections = obj.docstring.parsed
    table = next((s for s in sections if s.kind is griffe.DocstringSectionKind.parameters), None)
    rows = {row.name: row for row in (table.value if table else [])}
    for parameter in signature:
        if parameter.name not in rows:
            rows[parameter.name] = griffe.DocstringParameter(
                parameter.name,
                description=_description(parameter.name, rows, obj, references),
                annotation=parameter.annotation,
                value=parameter.default,
            )
            if not rows[parameter.name].description:
                UNDESCRIBED.setdefault(obj.path, []).append(parameter.name)
    ordered = [rows[p.name] for p in signature] + [
        row for name, row in rows.items() if name not in {p.name for p in signature}
    ]
    if table is None:
        text = [s for s in sections if s.kind is griffe.DocstringSectionKind.text]
        sections.insert(len(text[:1]), griffe.DocstringSectionParameters(ordered))
    else:
        table.value = ordered


def _description(name: str, rows: dict, obj: griffe.Object, references: dict) -> str:
    marker = re.compile(rf"(?:^|\s){re.escape(name)}: ")
    for row in rows.values():  # two parameters described in one row
        found = marker.search(row.description)
        if found:
            row.description, rest = (
                row.description[: found.start()].rstrip(),
                row.description[found.end() :],
            )
            return rest
    for referred in references.get(obj.path, []):  # "Other arguments as :func:`...`"
        for section in referred.docstring.parsed if referred.docstring else []:
            if section.kind is griffe.DocstringSectionKind.parameters:
                for row in section.value:
                    if row.name == name:
                        return row.description
    for section in obj.docstring.parsed:  # a clause of the text naming it
        if section.kind is griffe.DocstringSectionKind.text:
            for clause in re.split(r"(?<=[.;])\s+", section.value):
                if re.search(rf"``{re.escape(name)}(?:=[^`]*)?``", clause):
                    return clause.rstrip(";")
    return ""
