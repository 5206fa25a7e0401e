"""The pretraining example end to end on the CPU. The default tier: SCE's smoke run, resume and
every bad input; the slow tier adds the smoke runs of CACR, ReCo and the SimCLR framework and two
processes under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "pretrain.py"
# The offline CIFAR-10 subset beside the checkout; scikit-learn's bundled digits where it is absent.
SMALL = Path(
    os.environ.get("SCE_LOSS_TEST_DATA", ROOT.parent / "shared" / "data" / "cifar10-small.npz")
)
DATA = str(SMALL) if SMALL.is_file() else "digits"
pytest.importorskip("tqdm", reason="the example needs its extra: pip install '.[examples]'")
OFFICIAL = {
    "cacr": dict(
        attraction_temperature=1.0,
        repulsion_temperature=1.0,
        attraction_weight=1.0,
        repulsion_weight=1.0,
    ),
    "reco": dict(
        temperature=0.2,
        relation_temperature=0.1,
        target_temperature=0.04,
        global_weight=1.0,
        local_weight=1.0,  # zhangyifei01/ReCo main_reco.py: --lambda2 default 1.0
    ),
}


def pretrain(*args, launcher=(sys.executable,), timeout=300, cwd=ROOT):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launcher, str(SCRIPT), "--smoke", "--device", "cpu", "--data", DATA, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def assert_clear_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-3000:]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """SCE's smoke run with no --out: it writes into runs/smoke under the working directory."""
    cwd = tmp_path_factory.mktemp("smoke")
    result = pretrain(cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "runs" / "smoke", result


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


def test_smoke_runs_have_their_own_folder_and_say_where_they_wrote(smoke_run):
    """--smoke never writes into the main run's default folder (runs/pretrain), and the script
    names its output folder at the start and its files at the end."""
    out, result = smoke_run
    assert not (out.parent / "pretrain").exists()
    assert f"output folder: {out}" in result.stdout
    assert result.stdout.rstrip().endswith(
        ", ".join(
            str(Path("runs/smoke") / name)
            for name in ("checkpoint.pt", "summary.json", "curves.png")
        )
    )


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["cacr", "reco"])
def test_relational_losses_run_with_their_official_values(loss, tmp_path):
    result = pretrain("--loss", loss, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["loss"] == loss and summary["hyper_parameters"] == OFFICIAL[loss]
    assert summary["epochs"] == 2 and 0.0 <= summary["linear_top1"] <= 100.0
    assert summary["final_train_loss"] == summary["final_train_loss"]  # not NaN
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ("weak_queue" in checkpoint) == (loss == "reco")
    if loss == "reco":  # it resumes with its second queue
        resumed = pretrain("--loss", loss, "--out", str(tmp_path), "--resume", "--epochs", "3")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "after epoch 2" in resumed.stdout


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


def test_resume_of_another_runs_checkpoint_names_it_and_what_differs(smoke_run, tmp_path):
    out, _ = smoke_run
    (tmp_path / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    result = pretrain("--out", str(tmp_path), "--resume", "--loss", "cacr", "--queue-size", "64")
    assert_clear_error(
        result,
        f"the checkpoint {tmp_path / 'checkpoint.pt'} is from another run",
        "loss 'sce' there, 'cacr' here",
        "queue_size 128 there, 64 here",
    )


def test_resume_of_a_checkpoint_that_does_not_fit_the_model_gives_a_clear_error(
    smoke_run, tmp_path
):
    out, _ = smoke_run
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["online"]["projector.3.weight"] = state["online"]["projector.3.weight"][:64]
    torch.save(state, tmp_path / "checkpoint.pt")
    result = pretrain("--out", str(tmp_path), "--resume")
    assert_clear_error(
        result,
        f"the checkpoint {tmp_path / 'checkpoint.pt'} does not fit this run",
        "size mismatch for projector.3.weight",
    )


def test_a_hyper_parameter_of_another_loss_is_refused(tmp_path):
    result = pretrain("--out", str(tmp_path), "--loss", "infonce", "--coeff", "0.3")
    assert_clear_error(result, "--coeff does not apply to --loss infonce")


def test_bad_data_gives_a_clear_error(tmp_path):
    result = pretrain("--out", str(tmp_path), "--data", str(tmp_path / "missing.npz"))
    assert_clear_error(result, "missing.npz: file not found")
    result = pretrain("--out", str(tmp_path), "--data", str(tmp_path / "nothing-here"))
    assert_clear_error(
        result, "--data must be a .npz file, 'cifar10', 'digits' or an ImageFolder directory"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_a_cuda_device_gives_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--device", "cuda", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_clear_error(result, "--device cuda: this torch has no CUDA device")


@pytest.mark.parametrize(
    "loss, extra",
    [
        pytest.param("infonce", (), marks=pytest.mark.slow),
        pytest.param("sce", (), marks=pytest.mark.slow),
        pytest.param("ressl", (), marks=pytest.mark.slow),
        pytest.param("cacr", ("--views", "3"), marks=pytest.mark.slow),
    ],
)
def test_simclr_framework_runs_every_symmetric_loss(loss, extra, tmp_path):
    """--framework simclr: one encoder, two strong views (CACR: --views), no queue; with
    --no-checkpoint nothing but the summary and the plot is written."""
    result = pretrain(
        "--framework", "simclr", "--loss", loss, *extra, "--out", str(tmp_path), "--no-checkpoint"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["loss"] == loss and summary["final_train_loss"] == summary["final_train_loss"]
    assert not (tmp_path / "checkpoint.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "summary.json"]


def test_simclr_framework_refuses_reco(tmp_path):
    result = pretrain("--framework", "simclr", "--loss", "reco", "--out", str(tmp_path))
    assert_clear_error(result, "--loss reco needs the momentum encoder")


def test_resume_without_a_checkpoint_gives_a_clear_error(tmp_path):
    assert_clear_error(pretrain("--out", str(tmp_path), "--resume"), "no checkpoint at")


@pytest.mark.slow
def test_two_processes_under_torchrun_end_with_identical_queues(tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    result = pretrain("--out", str(tmp_path), "--epochs", "1", launcher=launcher, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["queue_identical_across_ranks"] is True
