"""Smoke test of the installed wheel, run by .ci/run in a fresh environment holding only torch and
the wheel, from a folder outside the source tree: the package imports from site-packages, its
version and typing marker are there, each public loss runs once, and sce-loss-check --quick
passes."""

import importlib.metadata
import importlib.resources
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

import sce_loss

installed = Path(sysconfig.get_paths()["purelib"]).resolve()
where = Path(sce_loss.__file__).resolve()
assert where.is_relative_to(installed), f"sce_loss imported from {where}, not {installed}"
assert sce_loss.__version__ == importlib.metadata.version("sce-loss"), sce_loss.__version__
assert (importlib.resources.files("sce_loss") / "py.typed").is_file(), "py.typed not installed"

generator = torch.Generator().manual_seed(0)


def unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


query, key, queue = unit(8, 16).requires_grad_(), unit(8, 16), unit(32, 16)
losses = {
    "sce_loss": sce_loss.sce_loss(query, key, queue),
    "info_nce_loss": sce_loss.info_nce_loss(query, key, queue),
    "ressl_loss": sce_loss.ressl_loss(query, key, queue),
    "cacr_loss": sce_loss.cacr_loss(unit(2, 8, 16).requires_grad_(), unit(2, 8, 16), queue),
    "reco_loss": sce_loss.reco_loss(
        query,
        key,
        queue,
        weak_key=unit(8, 16),
        weak_queue=unit(32, 16),
        mixed_query=unit(8, 16).requires_grad_(),
        mixed_key=sce_loss.interpolated_key(query, key, torch.randperm(8), 0.6),
    ),
}
for name, loss in losses.items():
    assert loss.dim() == 0 and torch.isfinite(loss), (name, loss)
    loss.backward()
    print(f"{name}: {loss.item():.6f}")
assert query.grad is not None and torch.isfinite(query.grad).all()

# The console script the wheel installed beside this interpreter (not one found on PATH).
command = Path(sys.executable).parent / "sce-loss-check"
assert command.is_file(), f"{command} not installed"
subprocess.run([str(command), "--quick"], check=True)
print(f"the wheel works: sce-loss {sce_loss.__version__} from {where.parent}")
