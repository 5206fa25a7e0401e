"""Every code block a user may copy from README.md and docs/ is checked:

- a Python block runs, with small stand-ins for the names it takes from the reader's own code
  (the model, the views, the loader);
- a block marked ``<!-- recipe CODEBASE -->`` is a fragment of another codebase: each of its
  statements is one that tests/test_recipes.py runs in a loop shaped like that codebase's (up to
  the backend), and the fragment runs as copied, in a fresh namespace holding only what it imports
  and the names that codebase provides where it goes in (``codebase_names``); marked
  ``<!-- recipe CODEBASE continues -->``, it runs after the Python block just above it, in the
  namespace that block leaves (a set-up followed by its training loop);
- a block marked ``<!-- signatures -->`` lists the public functions' real signatures;
- every ``python examples/pretrain.py`` command in a shell block is one the example accepts.
"""

import ast
import inspect
import re
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import sce_loss

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"(?:<!-- (?P<mark>[\w-]+)(?P<context>(?: [\w-]+)*) -->\n)?```(?P<language>\w+)\n"
    r"(?P<code>.*?)^```",
    re.S | re.M,
)


def blocks(language):
    """(document:line, mark, context words, code, the code of the block above in that language)
    of every block in that language."""
    found = []
    for path in DOCUMENTS:
        text, above = path.read_text(), None
        for match in BLOCK.finditer(text):
            if match["language"] == language:
                line = text.count("\n", 0, match.start("code"))
                context = tuple((match["context"] or "").split())
                found.append(
                    pytest.param(
                        match["mark"], context, match["code"], above, id=f"{path.name}:{line}"
                    )
                )
                above = match["code"]
    return found


def stand_ins() -> dict:
    """The names the usage blocks take from the reader's code: N = 8 samples of D = 128."""
    generator = torch.Generator().manual_seed(0)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=generator), dim=-1)

    n, d, m = 8, 128, 64
    online, momentum = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
    views = [torch.randn(n, d, generator=generator) for _ in range(2)]
    return dict(
        query=unit(n, d).requires_grad_(),
        key=unit(n, d),
        online=online,
        momentum=momentum,
        strong_view=views[0],
        weak_view=views[1],
        loader=[(views[1], views[0])] * 2,
        update_momentum_encoder=lambda: None,
        optimizer=torch.optim.SGD(online.parameters(), lr=0.1),
        device="cpu",
        queue=unit(m, d),
        crops=unit(2, n, d),
        z0=unit(n, d).requires_grad_(),
        z1=unit(n, d).requires_grad_(),
        z2=unit(n, d).requires_grad_(),
        queries=unit(2, n, d).requires_grad_(),
        keys=unit(2, n, d),
        views=unit(3, n, d).requires_grad_(),
        labels=torch.arange(n) % 3,  # class labels, several samples each
        q1=unit(n, d).requires_grad_(),  # MoCo v3: the online queries of views 1 and 2 ...
        q2=unit(n, d).requires_grad_(),
        k1=unit(n, d),  # ... and the momentum encoder's keys
        k2=unit(n, d),
        p1=unit(n, d).requires_grad_(),  # NNCLR: the predictor's outputs
        p2=unit(n, d).requires_grad_(),
        image_features=unit(n, d).requires_grad_(),  # CLIP: the towers' normalised outputs
        text_features=unit(n, d).requires_grad_(),
        logit_scale=torch.tensor(1 / 0.07).log().requires_grad_(),
        index=torch.randperm(n, generator=generator),  # the CutMix partners
        ratio=0.6,
        weak_key=unit(n, d),
        weak_queue=unit(m, d),
        mixed_query=unit(n, d).requires_grad_(),
    )


def codebase_names(codebase: str) -> dict:
    """The names a recipe fragment takes from its codebase where it goes in, small and on the CPU
    (N = 8 samples of D = 128, a queue of K = 64):

    - ``moco``, the official MoCo code's ``MoCo.forward`` after ``q`` and ``k`` (normalised): ``q``,
      ``k`` and ``self``, the builder, with its (D, K) ``queue`` buffer, its temperature ``T`` and
      ``_dequeue_and_enqueue``;
    - ``solo-learn-mocov2plus``, ``training_step``: ``q1``, ``k2`` (normalised) and ``self``, the
      method, with its (2, D, K) ``queue`` and ``temperature``;
    - ``lightly-moco``, the training script: ``model`` (raw projection outputs, and
      ``forward_momentum``), ``dataloader`` (``LightlyDataset``'s (views, targets, filenames)),
      ``optimizer`` and ``device``;
    - ``solo-learn-simclr``, ``SimCLR.training_step``: ``out`` (``out["z"]``, the two views' raw
      projections) and ``self``, the method, with its ``temperature``.
    """
    n, d, k = 8, 128, 64
    generator = torch.Generator().manual_seed(0)

    def unit(*shape, dim=-1):
        return F.normalize(torch.randn(*shape, generator=generator), dim=dim)

    if codebase == "moco":
        builder = SimpleNamespace(queue=unit(d, k, dim=0), T=0.2, _dequeue_and_enqueue=print)
        return dict(self=builder, q=unit(n, d).requires_grad_(), k=unit(n, d))
    if codebase == "solo-learn-mocov2plus":
        method = SimpleNamespace(queue=unit(2, d, k, dim=1), temperature=0.2)
        return dict(self=method, q1=unit(n, d).requires_grad_(), k2=unit(n, d))
    if codebase == "lightly-moco":
        model = torch.nn.Linear(d, d)
        model.forward_momentum = lambda x: model(x).detach()
        views = [torch.randn(n, d, generator=generator) for _ in range(2)]
        return dict(
            model=model,
            dataloader=[(views, torch.zeros(n), [f"{i}.png" for i in range(n)])] * 2,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            device="cpu",
        )
    if codebase == "solo-learn-simclr":
        z = [torch.randn(n, d, generator=generator).requires_grad_() for _ in range(2)]
        return dict(self=SimpleNamespace(temperature=0.2), out={"z": z})
    raise AssertionError(f"no names for the codebase {codebase!r}")


def run_fragment(code: str, namespace: dict) -> Tensor:
    """Run a recipe fragment as the body of a function (it may ``return``) with ``namespace`` as
    its globals; the loss it returns or leaves in ``loss`` or ``nce_loss``."""
    source = "def fragment():\n" + textwrap.indent(code, "    ") + "    return locals()\n"
    exec(compile(source, "<recipe>", "exec"), namespace)
    result = namespace["fragment"]()
    if isinstance(result, dict):
        result = result.get("loss", result.get("nce_loss"))
    return result


@pytest.mark.parametrize("mark, context, code, above", blocks("python"))
def test_python_blocks(mark, context, code, above):
    if mark == "recipe":
        statements = _simple_statements(ast.parse(code))
        ran = set(_simple_statements(ast.parse((ROOT / "tests" / "test_recipes.py").read_text())))
        assert statements and not set(statements) - ran, set(statements) - ran
        codebase, *rest = context
        assert rest in ([], ["continues"]), context
        namespace = {"__builtins__": __builtins__, **codebase_names(codebase)}
        if rest:
            exec(compile(above, "<block above>", "exec"), namespace)
        loss = run_fragment(code, namespace)
        assert isinstance(loss, Tensor) and loss.dim() == 0 and torch.isfinite(loss)
    elif mark == "signatures":
        for signature in re.split(r"\n(?=\w)", code.strip()):
            _assert_signature(signature)
    else:
        assert mark is None, f"unknown mark {mark!r}"
        namespace = stand_ins()
        exec(compile(code, "<block>", "exec"), namespace)
        if "loss" in namespace:
            loss = namespace["loss"]
            assert loss.dim() == 0 and torch.isfinite(loss)


def _simple_statements(tree) -> list[str]:
    """The value of every assignment, expression and return in ``tree`` (at any depth), as
    source without the ``backend`` keyword (the tests run each recipe on several backends)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.Expr, ast.Return)) and not (
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        ):
            for call in ast.walk(node):
                if isinstance(call, ast.Call):
                    call.keywords = [k for k in call.keywords if k.arg != "backend"]
            found.append(ast.unparse(node.value))
    return found


def _assert_signature(signature: str) -> None:
    """``name(a, b=1, *, c=2)`` as written is the function's signature: names, order, defaults
    and which parameters are keyword-only."""
    name, parameters = signature.split("(", 1)
    namespace = {}
    exec(f"def written({parameters}:\n    pass", namespace)
    written = inspect.signature(namespace["written"])
    actual = inspect.signature(getattr(sce_loss, name))
    assert [(p.name, p.kind, p.default) for p in written.parameters.values()] == [
        (p.name, p.kind, p.default) for p in actual.parameters.values()
    ], name


@pytest.mark.parametrize("mark, context, code, above", blocks("bash"))
def test_example_commands_parse(mark, context, code, above):
    pytest.importorskip(
        "sklearn", reason="the example needs its extra: pip install -e '.[examples]'"
    )
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import pretrain
    finally:
        sys.path.pop(0)
    for line in code.splitlines():
        command = line.split("#")[0].split()
        if "examples/pretrain.py" in command:
            arguments = command[command.index("examples/pretrain.py") + 1 :]
            pretrain.parse_args(arguments)


def test_the_check_commands_help_is_plain_text(capsys):
    """``sce-loss-check --help`` prints its module docstring: no reST markup in it."""
    from sce_loss import check

    with pytest.raises(SystemExit) as done:
        check.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "sce-loss-check" in text and "--out DIR" in text
    assert not re.search(r"``|:(func|class|mod|meth):`", text), text


HELP_SCRIPTS = sorted(
    str(p.relative_to(ROOT))
    for folder in ("examples", "benchmarks")
    for p in (ROOT / folder).glob("*.py")
    if "argparse" in p.read_text()
)


@pytest.mark.parametrize("script", HELP_SCRIPTS)
def test_every_scripts_help_is_plain_text(script):
    """A script's --help prints its module docstring (RawDescriptionHelpFormatter) and each
    argument's help: no reST markup in either."""
    import ast

    tree = ast.parse((ROOT / script).read_text())
    texts = [ast.get_docstring(tree) or ""]
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in ("help", "description"):
            texts += [c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)]
    for text in texts:
        assert not re.search(r"``|:(func|class|mod|meth):`", str(text)), (script, text)


def api_page():
    """The package as the API page renders it: loaded by griffe with docs/griffe_extension.py,
    as mkdocs.yml configures it; the extension module, for what it records."""
    griffe = pytest.importorskip("griffe", reason="the docs extra: pip install -e '.[docs]'")
    import importlib.util

    assert "docs/griffe_extension.py:ReSTForMkdocstrings" in (ROOT / "mkdocs.yml").read_text()
    spec = importlib.util.spec_from_file_location(
        "griffe_extension", ROOT / "docs" / "griffe_extension.py"
    )
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    package = griffe.load(
        "sce_loss",
        search_paths=[str(ROOT)],
        docstring_parser="google",
        extensions=griffe.load_extensions(extension.ReSTForMkdocstrings()),
    )
    rendered = []
    for name in sce_loss.__all__:
        obj = package[name].final_target
        rendered.append(obj)
        if obj.is_class:
            rendered += [
                m
                for n, m in obj.members.items()
                if m.is_function and not n.startswith("_") and m.docstring is not None
            ]
    return rendered, extension


# Parameters whose docstring describes them nowhere (their rows are empty): the docstrings are to
# say what each takes, and then this goes.
UNDESCRIBED = {
    "sce_loss.functional.sce_loss": ["target_temperature"],
    "sce_loss.queue.MemoryQueue": ["dtype", "device"],
}


def test_the_api_page_links_each_role_and_gives_each_parameter_a_row():
    rendered, extension = api_page()
    for obj in rendered:
        assert not re.search(r":(func|class|mod|meth|attr):`", obj.docstring.value), obj.path
        table = [s for s in obj.docstring.parsed if s.kind.value == "parameters"]
        names = [p.name for p in obj.parameters if p.name != "self"]
        assert [row.name for row in table[0].value] == names, obj.path
    assert extension.UNDESCRIBED == UNDESCRIBED
    assert "[`info_nce_loss`][sce_loss.info_nce_loss]" in rendered[0].docstring.value


@pytest.mark.parametrize(
    "module",
    [
        sce_loss.SCELoss,
        sce_loss.InfoNCELoss,
        sce_loss.ReSSLLoss,
        sce_loss.CACRLoss,
        sce_loss.ReCoLoss,
    ],
)
def test_each_module_documents_each_of_its_arguments(module):
    """Its own docstring, not its function's: an ``Args:`` line for every keyword."""
    doc = inspect.getdoc(module)
    for name in inspect.signature(module).parameters:
        assert re.search(rf"^    {name}: \S", doc, re.M), (module.__name__, name)


def _command(line: str) -> str:
    """A shell line without its trailing comment."""
    return re.sub(r"\s+#\s.*$", "", line).strip()


def ci_script() -> tuple[set[str], list[str]]:
    """.ci/run's commands, and its comment blocks (runs of comment lines, joined)."""
    commands, comments, block = set(), [], []
    for line in (ROOT / ".ci" / "run").read_text().splitlines():
        if line.strip().startswith("#"):
            block.append(line.strip().lstrip("#").strip())
            continue
        if block:
            comments.append(" ".join(block))
            block = []
        if line.strip():
            commands.add(_command(line))
    return commands, comments


def documented_commands() -> list:
    """Each command of the README's set-up block, and each ``pip install`` line of the README
    and the docs, in a code block or inline."""
    found = []
    readme = (ROOT / "README.md").read_text()
    setup = BLOCK.search(readme, readme.index("## Set-up"))["code"]
    found += [
        ("README.md set-up", _command(line))
        for line in setup.splitlines()
        if not line.startswith("#")
    ]
    for path in DOCUMENTS:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            if match["language"] == "bash":
                found += [
                    (path.name, _command(line))
                    for line in match["code"].splitlines()
                    if line.startswith("pip install")
                ]
        found += [(path.name, span) for span in re.findall(r"`(pip install [^`]+)`", text)]
    return [pytest.param(command, id=f"{where}: {command}") for where, command in found if command]


@pytest.mark.parametrize("command", documented_commands())
def test_ci_runs_each_documented_install_and_set_up_command_as_written(command):
    """Copied from the docs, it is a line of .ci/run; or .ci/run says, next to it, why it cannot
    run there."""
    commands, comments = ci_script()
    explained = [c for c in comments if command in c and re.search(r"(cannot|not) run here", c)]
    assert command in commands or explained, command
