"""The pretraining example end to end on the CPU: smoke run, resume, bad input, two processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "pretrain.py"
# The offline CIFAR-10 subset beside the checkout; scikit-learn's bundled digits where it is absent.
SMALL = Path(os.environ.get("SCE_LOSS_TEST_DATA", ROOT.parent / "shared" / "data" / "cifar10-small.npz"))
DATA = str(SMALL) if SMALL.is_file() else "digits"
pytest.importorskip("tqdm", reason="the example needs its extra: pip install '.[examples]'")


def pretrain(*args, launcher=(sys.executable,), timeout=300):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, str(SCRIPT), "--smoke", "--device", "cpu", "--data", DATA, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    result = pretrain("--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_smoke_run_writes_a_sane_summary_checkpoint_and_plot(smoke_run):
    out, _ = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss"] == "sce" and summary["epochs"] == 2 and summary["device"] == "cpu"
    assert summary["data"] == Path(DATA).name
    for metric in ("knn_top1", "linear_top1"):
        assert 0.0 <= summary[metric] <= 100.0
    assert summary["wall_s"] > 0 and summary["images_per_s"] > 0 and summary["torch"]
    assert summary["final_train_loss"] > 0
    assert (out / "checkpoint.pt").is_file() and (out / "curves.png").stat().st_size > 1000


def test_resume_continues_the_same_run(smoke_run, tmp_path):
    out, _ = smoke_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    result = pretrain("--out", str(resumed), "--resume", "--epochs", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "after epoch 2" in result.stdout
    assert "epoch 1/3" not in result.stderr and "epoch 3/3" in result.stderr
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["epochs"] == 3
    first = json.loads((out / "summary.json").read_text())
    assert summary["wall_s"] > first["wall_s"]  # the first two epochs' time is carried over


def test_bad_data_gives_a_clear_error(tmp_path):
    result = pretrain("--out", str(tmp_path), "--data", str(tmp_path / "missing.npz"))
    assert result.returncode != 0
    assert "--data must be a .npz file, 'cifar10', 'digits' or an ImageFolder directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_without_a_checkpoint_gives_a_clear_error(tmp_path):
    result = pretrain("--out", str(tmp_path), "--resume")
    assert result.returncode != 0 and "no checkpoint at" in result.stderr and "Traceback" not in result.stderr


def test_two_processes_under_torchrun_end_with_identical_queues(tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    result = pretrain("--out", str(tmp_path), "--epochs", "1", launcher=launcher, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["queue_identical_across_ranks"] is True
