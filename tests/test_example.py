"""The pretraining example end to end on the CPU. The default tier: SCE's smoke run, resume and
every bad input; the slow tier adds the smoke runs of CACR, ReCo and the SimCLR framework and two
processes under torchrun."""

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "pretrain.py"
# The offline CIFAR-10 subset beside the checkout; scikit-learn's bundled digits where it is absent.
SMALL = Path(
    os.environ.get("SCE_LOSS_TEST_DATA", ROOT.parent / "shared" / "data" / "cifar10-small.npz")
)
DATA = str(SMALL) if SMALL.is_file() else "digits"
pytest.importorskip("tqdm", reason="the example needs its extra: pip install -e '.[examples]'")
sys.path.insert(0, str(ROOT / "examples"))
import data  # noqa: E402
import pretrain as example  # noqa: E402
import study_table  # noqa: E402

sys.path.pop(0)
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


# -- the command line: every value is checked when parsed, before data or model --------------------


def refusal(capsys, *argv):
    """parse_args' message for refused ``argv``: argparse's usage error (exit status 2)."""
    with pytest.raises(SystemExit) as exit_:
        example.parse_args(list(argv))
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
        (["--batch-size", "-5"], "argument --batch-size: must be a positive integer, got '-5'"),
        (["--batch-size", "1.5"], "argument --batch-size: must be a positive integer, got '1.5'"),
        (["--epochs", "-1"], "argument --epochs: must be an integer ≥ 0, got '-1'"),
        (["--warmup-epochs", "-2"], "argument --warmup-epochs: must be an integer ≥ 0, got '-2'"),
        (["--queue-size", "0"], "argument --queue-size: must be a positive integer, got '0'"),
        (["--width", "0"], "argument --width: must be a positive integer, got '0'"),
        (["--per-class", "0"], "argument --per-class: must be a positive integer, got '0'"),
        (["--views", "1", "--loss", "cacr"], "argument --views: must be an integer ≥ 2, got '1'"),
        (["--lr", "0"], "argument --lr: must be a finite number > 0, got '0'"),
        (["--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
        (["--weight-decay=-1e-4"], "argument --weight-decay: must be a finite number ≥ 0"),
        (["--momentum", "1.5"], "argument --momentum: must be a number in [0, 1], got '1.5'"),
        (["--knn-every", "0"], "argument --knn-every: must be a positive integer, got '0'"),
        (["--knn-k", "0"], "argument --knn-k: must be a positive integer, got '0'"),
        (["--knn-t", "-0.1"], "argument --knn-t: must be a finite number > 0, got '-0.1'"),
        (["--probe-epochs", "0"], "argument --probe-epochs: must be a positive integer"),
        (["--train-subset", "0"], "argument --train-subset: must be a positive integer"),
        (["--steps-per-epoch", "0"], "argument --steps-per-epoch: must be a positive integer"),
        (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**32), got '-1'"),
        # the loss hyper-parameters, through the library's own checks
        (["--temperature", "0"], "argument --temperature: temperature must be a finite number"),
        (["--coeff", "1.5"], "argument --coeff: coeff must be in [0, 1], got 1.5"),
        (["--target-temperature", "nan"], "argument --target-temperature: target_temperature"),
        (
            ["--loss", "cacr", "--repulsion-weight", "-1"],
            "argument --repulsion-weight: repulsion_weight must be a finite number ≥ 0",
        ),
        (
            ["--loss", "reco", "--relation-temperature", "0"],
            "argument --relation-temperature: relation_temperature must be a finite number",
        ),
        (["--loss", "infonce", "--coeff", "0.3"], "--coeff does not apply to --loss infonce"),
        (["--resume", "--overwrite"], "--resume continues the run in --out and --overwrite"),
        (["--per-class", "5", "--train-subset", "9"], "--per-class and --train-subset both"),
        (["--framework", "simclr", "--loss", "reco"], "--loss reco needs the momentum encoder"),
        (["--views", "3"], "--views applies to --loss cacr"),
    ],
)
def test_bad_values_are_refused_when_parsed_naming_the_flag(capsys, argv, message):
    assert message in refusal(capsys, *argv)


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_when_parsed(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    message = "argument --batch-size: 64 must be divisible by the 3 ranks"
    assert message in refusal(capsys, "--batch-size", "64")
    assert message in refusal(capsys)  # the digits default, 64


def test_a_refused_command_reads_no_data_and_builds_no_model(capsys, monkeypatch, tmp_path):
    def must_not_run(*args, **kwargs):
        raise AssertionError("reached past the checks")

    monkeypatch.setattr(example, "Run", must_not_run)
    monkeypatch.setattr(example.data, "load", must_not_run)
    for argv in (["--batch-size", "0"], ["--temperature", "0"], ["--resume"]):
        with pytest.raises(SystemExit) as exit_:
            example.main([*argv, "--out", str(tmp_path / "out")])
        assert exit_.value.code == 2
    assert "--resume: no checkpoint at" in capsys.readouterr().err


def test_smoke_honours_the_flags_it_is_given():
    preset = example.parse_args(["--smoke"])
    assert {name: getattr(preset, name) for name in example.SMOKE} == example.SMOKE
    given = dict(
        width=8,
        epochs=4,
        warmup_epochs=2,
        batch_size=16,
        queue_size=64,
        steps_per_epoch=5,
        knn_every=2,
        probe_epochs=7,
        train_subset=300,
        test_subset=100,
    )
    assert set(given) == set(example.SMOKE)
    argv = [f"--{name.replace('_', '-')}={value}" for name, value in given.items()]
    args = example.parse_args(["--smoke", *argv])
    assert {name: getattr(args, name) for name in given} == given
    # --per-class chooses the training images in place of the preset's subset
    assert example.parse_args(["--smoke", "--per-class", "20"]).train_subset is None


def test_the_defaults_follow_the_data():
    digits, cifar = example.parse_args([]), example.parse_args(["--data", "cifar10"])
    assert (digits.epochs, digits.batch_size, digits.queue_size) == (20, 64, 1024)
    assert (cifar.epochs, cifar.batch_size, cifar.queue_size) == (200, 256, 4096)
    for args in (digits, cifar):
        assert (args.warmup_epochs, args.knn_every, args.probe_epochs) == (5, 10, 100)
        assert args.width == 64 and args.out == Path("runs/pretrain")


def stub_run(monkeypatch):
    """Replace the run itself; returns the list of the arguments it was started with."""
    started = []

    class Run:
        def __init__(self, args, dataset):
            started.append(args)

        def run(self):
            return {}

    monkeypatch.setattr(example, "Run", Run)
    return started


def test_an_output_folder_that_holds_files_is_refused_without_resume_or_overwrite(
    capsys, monkeypatch, tmp_path
):
    started = stub_run(monkeypatch)
    for name in ("summary.json", "curves.png", "checkpoint.pt", "notes.txt"):
        (tmp_path / name).write_text("previous run")
    with pytest.raises(SystemExit) as exit_:
        example.main(["--out", str(tmp_path)])
    assert exit_.value.code == 2 and not started
    assert (
        f"argument --out: {tmp_path} already holds files (checkpoint.pt, curves.png, notes.txt, "
        "summary.json); pass --resume to continue its run, --overwrite to start afresh there"
    ) in capsys.readouterr().err
    example.main(["--out", str(tmp_path), "--resume"])  # the checkpoint is there
    assert len(started) == 1 and (tmp_path / "summary.json").is_file()
    example.main(["--out", str(tmp_path), "--overwrite"])  # the run's own files go
    assert len(started) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    (tmp_path / "notes.txt").unlink()
    example.main(["--out", str(tmp_path)])  # an empty folder is fine
    assert len(started) == 3


def test_overwrite_deletes_nothing_when_a_check_against_the_data_refuses(capsys, tmp_path):
    (tmp_path / "summary.json").write_text("previous run")
    with pytest.raises(SystemExit):
        example.main(["--out", str(tmp_path), "--overwrite", "--batch-size", "5000"])
    assert "argument --batch-size: 5000 is more than the 1500" in capsys.readouterr().err
    assert (tmp_path / "summary.json").read_text() == "previous run"


def test_an_output_path_that_is_a_file_is_refused(capsys, monkeypatch, tmp_path):
    stub_run(monkeypatch)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        example.main(["--out", str(tmp_path / "file"), "--overwrite"])
    assert f"argument --out: {tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


def test_width_sets_the_base_channels():
    for width in (64, 16):
        encoder = example.Encoder(width)
        convolutions = [m for m in encoder.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convolutions[0].out_channels == width and convolutions[-1].out_channels == 8 * width
        assert encoder.backbone.feature_dim == 8 * width
        assert encoder(torch.zeros(2, 3, 16, 16)).shape == (2, 128)


# -- data, evaluation, the study's scripts ------------------------------------------------------


def test_per_class_keeps_the_first_images_of_each_class_in_order():
    labels = np.array([2, 0, 0, 1, 2, 2, 1, 0, 1, 2])
    assert data.first_per_class(labels, 2).tolist() == [0, 1, 2, 3, 4, 6]
    assert data.first_per_class(labels, 3).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="--per-class: 4 is more than the 3 training images of"):
        data.first_per_class(labels, 4)


def jpeg_pack(path, train_labels, test_labels):
    """A JPEG pack in the offline CIFAR-10 copy's format; image i is uniformly grey level i."""
    from PIL import Image

    parts = {}
    for split, labels in (("train", train_labels), ("test", test_labels)):
        blobs = []
        for i in range(len(labels)):
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), (10 * i,) * 3).save(buffer, "JPEG", quality=95)
            blobs.append(np.frombuffer(buffer.getvalue(), np.uint8))
        parts[f"{split}_jpeg"] = np.concatenate(blobs)
        parts[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs])
        parts[f"y_{split}"] = np.array(labels, np.uint8)
    np.savez(path, **parts)


def test_cifar10_reads_the_jpeg_pack_in_data_dir_and_keeps_the_first_per_class(tmp_path):
    jpeg_pack(tmp_path / data.CIFAR10_PACK, [1, 0, 1, 1, 0, 0, 1], [0, 1, 1])
    dataset = data.load("cifar10", tmp_path, per_class=2)
    assert dataset.name == "cifar10"
    assert dataset.y_train.tolist() == [1, 0, 1, 0]  # images 0, 1, 2 and 4, in that order
    grey = dataset.x_train.float().mean((1, 2, 3))
    assert torch.allclose(grey, torch.tensor([0.0, 10.0, 20.0, 40.0]), atol=2)
    assert dataset.x_train.shape == (4, 3, 8, 8) and dataset.x_train.dtype == torch.uint8
    assert dataset.y_test.tolist() == [0, 1, 1] and len(dataset.x_test) == 3  # the whole test set
    assert len(data.load("cifar10", tmp_path).y_train) == 7


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="checks a set-up without it"
)
def test_cifar10_without_the_pack_or_torchvision_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=f"no {data.CIFAR10_PACK} in --data-dir {tmp_path}") as e:
        data.load("cifar10", tmp_path)
    assert "your torch pinned (the README's Set-up gives the line" in str(e.value)
    assert "sce-loss[vision]" not in str(e.value)  # unpinned, it would replace a CPU torch


def test_the_few_label_probe_tells_separable_features_from_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(30)
    noise = torch.randn(300, 32, generator=generator)
    separable = noise[:, :10] * 0.1 + torch.nn.functional.one_hot(labels, 10).float()
    test = slice(200, None)
    probe = example.evaluate.few_label_probe_top1

    def top1(features, per_class=3):
        return probe(features[:200], labels[:200], features[test], labels[test], per_class, 5)

    assert top1(separable) == 100.0
    assert top1(noise) < 30.0  # chance is 10
    assert top1(noise) == top1(noise)  # the same draws every time


def test_the_study_script_runs_each_run_once_resuming_an_interrupted_one(tmp_path):
    """examples/study.sh with a stand-in for python that logs its arguments and finishes the run:
    a finished run is skipped, an interrupted one resumed, and every command is one the example
    accepts, with the study's settings."""
    results, log = tmp_path / "results", tmp_path / "calls"
    stand_in = tmp_path / "python"
    stand_in.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >>{log}\n'
        "while [[ $# -gt 0 ]]; do [[ $1 == --out ]] && out=$2; shift; done\n"
        'mkdir -p "$out" && echo {} >"$out/summary.json"\n'
    )
    stand_in.chmod(0o755)
    finished, interrupted = (
        results / f"cifar10-{loss}-w16-k1000-seed0" for loss in ("sce", "infonce")
    )
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text("{}")
    interrupted.mkdir()
    (interrupted / "checkpoint.pt").write_text("")
    env = os.environ | dict(PYTHON=str(stand_in), RESULTS=str(results), SEEDS="0 1")
    result = subprocess.run(
        ["bash", str(ROOT / "examples" / "study.sh")], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert f"finished, skipped: {finished}" in result.stdout
    calls = [line.split() for line in log.read_text().splitlines()]
    runs = [(call[call.index("--loss") + 1], call[call.index("--seed") + 1]) for call in calls]
    assert runs == [
        ("infonce", "0"),
        ("ressl", "0"),
        ("sce", "1"),
        ("infonce", "1"),
        ("ressl", "1"),
    ]
    assert ["--resume" in call for call in calls] == [True, False, False, False, False]
    hyper = dict(
        sce=dict(coeff=0.5, temperature=0.1, target_temperature=0.05),
        infonce=dict(temperature=0.2),
        ressl=dict(temperature=0.1, target_temperature=0.04),
    )
    for call, (loss, seed) in zip(calls, runs):
        assert call[0] == "examples/pretrain.py"
        args = example.parse_args(call[1:])
        assert (args.data, args.per_class, args.width, args.epochs) == ("cifar10", 1000, 16, 25)
        assert (args.knn_every, args.seed, args.hyper_parameters) == (5, int(seed), hyper[loss])
        assert args.out == results / f"cifar10-{loss}-w16-k1000-seed{seed}"
        command = (args.out / "command.txt").read_text()
        assert command.startswith("python examples/pretrain.py --data cifar10")
        assert "--resume" not in command


def fake_summary(loss, seed, knn, linear, untrained, curve, wall):
    return dict(
        loss=loss,
        seed=seed,
        epochs=curve[-1][0],
        knn_top1=knn,
        linear_top1=linear,
        untrained=dict(knn_top1=untrained, linear_top1=untrained + 1),
        history=[dict(epoch=e, loss=None, knn_top1=k) for e, k in curve],
        wall_s=wall,
    )


def test_the_study_table_gives_mean_and_spread_over_seeds_beside_the_untrained(tmp_path):
    runs = [
        fake_summary("sce", 0, 60.0, 70.0, 30.0, [(0, 30.0), (5, 50.0), (10, 60.0)], 100.0),
        fake_summary("sce", 1, 62.0, 72.0, 32.0, [(0, 32.0), (5, 52.0), (10, 62.0)], 110.0),
        fake_summary("sce", 2, 64.0, 74.0, 34.0, [(0, 34.0), (5, 54.0), (10, 64.0)], 120.0),
        fake_summary("infonce", 0, 55.0, 65.0, 30.0, [(0, 30.0), (5, 45.0), (10, 55.0)], 90.0),
    ]
    for summary in runs:
        folder = tmp_path / f"cifar10-{summary['loss']}-w16-k1000-seed{summary['seed']}"
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "cifar10-ressl-w16-k1000-seed0").mkdir()  # unfinished: no summary, left out
    study_table.main(["--results", str(tmp_path)])
    assert (tmp_path / "cifar10-w16-k1000-study.md").read_text().splitlines() == [
        "| loss | seeds | epochs | kNN top-1 | kNN top-1, untrained | linear probe | linear probe, "
        "untrained | training time per run, median |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        "| infonce | 0 | 10 | 55.0 | 30.0 | 65.0 | 31.0 | 90 s |",
        "| sce | 0, 1, 2 | 10 | 62.0 ± 2.0 | 32.0 ± 2.0 | 72.0 ± 2.0 | 33.0 ± 2.0 | 110 s |",
    ]
    assert (tmp_path / "cifar10-w16-k1000-study-knn.png").stat().st_size > 1000


def test_smoke_run_writes_a_sane_summary_checkpoint_and_plot(smoke_run):
    out, _ = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss"] == "sce" and summary["epochs"] == 2 and summary["device"] == "cpu"
    assert summary["data"] == Path(DATA).name and summary["width"] == 16
    assert summary["train_images"] == 512 and summary["test_images"] == 256
    metrics = sorted(example.METRIC_NAMES)
    assert sorted(k for k in summary if k.endswith("_top1")) == metrics
    assert sorted(summary["untrained"]) == metrics  # measured before the first step
    for value in [summary[k] for k in metrics] + list(summary["untrained"].values()):
        assert 0.0 <= value <= 100.0
    assert summary["history"][0] == dict(
        epoch=0, loss=None, knn_top1=summary["untrained"]["knn_top1"]
    )
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    assert summary["history"][-1]["knn_top1"] == summary["knn_top1"]
    assert summary["wall_s"] > 0 and summary["images_per_s"] > 0 and summary["torch"]
    assert summary["final_train_loss"] > 0
    assert (out / "checkpoint.pt").is_file() and (out / "curves.png").stat().st_size > 1000


def test_smoke_runs_have_their_own_folder_and_say_where_they_wrote(smoke_run):
    """--smoke never writes into the main run's default folder (runs/pretrain), and the script
    names its output folder at the start and, in its closing sentence, its files."""
    out, result = smoke_run
    assert not (out.parent / "pretrain").exists()
    assert f"output folder: {out}" in result.stdout
    assert result.stdout.rstrip().endswith(
        "Files in runs/smoke: checkpoint.pt, summary.json, curves.png."
    )


def test_the_job_ends_with_a_sentence_of_what_it_trained_and_found(smoke_run):
    out, result = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    results = ", ".join(
        f"{name} {summary[key]:.1f}% (untrained {summary['untrained'][key]:.1f}%)"
        for key, name in zip(
            ("knn_top1", "few_label_top1", "linear_top1"),
            ("kNN top-1", "linear probe on 1 label per class", "linear probe on every label"),
        )
    )
    assert result.stdout.rstrip().splitlines()[-1] == (
        "Trained a ResNet-18 (width 16) MoCo-style with SCE (coeff=0.5, temperature=0.1, "
        f"target_temperature=0.05) for 2 epochs on {Path(DATA).name} (512 training images, 256 "
        f"test images): {results}. Files in runs/smoke: checkpoint.pt, summary.json, curves.png."
    )


def test_without_a_terminal_each_epoch_is_one_line_and_there_is_no_progress_bar(smoke_run):
    _, result = smoke_run
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2, result.stdout
    for epoch, line in enumerate(lines, 1):
        assert re.fullmatch(
            rf"epoch {epoch}/2: loss \d+\.\d{{4}}, \d+ img/s, kNN top-1 \d+\.\d%, ETA \d+ s",
            line,
        ), line
    assert "\r" not in result.stderr and "it/s" not in result.stderr


def test_the_plot_has_a_legend_coloured_axes_and_whole_epochs():
    history = [dict(epoch=0, loss=None, knn_top1=50.0)]
    history += [dict(epoch=e, loss=5.0 - e / 10, knn_top1=50.0 + e) for e in (1, 2)]
    figure = example.curves_figure(history, "title")
    figure.canvas.draw()
    loss_axis, knn_axis = figure.axes
    legend = [text.get_text() for text in loss_axis.get_legend().get_texts()]
    assert legend == ["training loss", "kNN top-1 (epoch 0: untrained)"]
    for axis in (loss_axis, knn_axis):
        (line,) = axis.get_lines()
        assert axis.yaxis.label.get_color() == line.get_color()
        assert {label.get_color() for label in axis.get_yticklabels()} == {line.get_color()}
    ticks = [t for t in loss_axis.get_xticks() if 0 <= t <= 2]
    assert ticks == [0, 1, 2]  # not 0, 0.25, 0.5...


def test_an_untrained_runs_plot_has_no_loss_scale():
    figure = example.curves_figure([dict(epoch=0, loss=None, knn_top1=50.0)], "title")
    loss_axis, knn_axis = figure.axes
    assert list(loss_axis.get_yticks()) == [] and loss_axis.yaxis.label.get_text() == ""
    assert len(knn_axis.get_lines()) == 1


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


@pytest.mark.slow  # a second run of the script (25 s); the resume refusals stay in the default tier
def test_resume_continues_the_same_run(smoke_run, tmp_path):
    out, _ = smoke_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    result = pretrain("--out", str(resumed), "--resume", "--epochs", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "after epoch 2" in result.stdout
    assert "epoch 1/3" not in result.stdout and "epoch 3/3: loss" in result.stdout
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["epochs"] == 3
    first = json.loads((out / "summary.json").read_text())
    assert summary["wall_s"] > first["wall_s"]  # the first two epochs' time is carried over
    # the untrained figures come from the checkpoint, not from the trained network
    assert "untrained:" not in result.stdout
    assert summary["untrained"] == first["untrained"]
    assert summary["history"][:3] == first["history"]


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


def test_a_file_that_is_not_an_npz_is_refused_as_such(capsys):
    message = refusal(capsys, "--data", str(ROOT / "README.md"))
    assert "is none of these (a file, not a .npz)" in message


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="checks a set-up without it"
)
def test_an_image_folder_without_torchvision_says_what_to_install(capsys, tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
    message = data_refusal(capsys, "--data", str(tmp_path))
    assert f"argument --data: {tmp_path} is an ImageFolder directory" in message
    assert "torchvision, is not installed: install the vision extra" in message


@pytest.mark.parametrize("name", ["missing.npz", "nothing-here"])
def test_data_that_is_not_there_is_refused_when_parsed(capsys, tmp_path, name):
    message = refusal(capsys, "--data", str(tmp_path / name))
    assert "argument --data: expected 'digits', 'cifar10', a .npz file or an ImageFolder" in message
    assert f"{str(tmp_path / name)!r} is none of these (no such file or folder)" in message


def data_refusal(capsys, *argv):
    """load_data's message for ``argv``, whose values are refused only against the data."""
    parser = example.build_parser()
    args = example.parse_args(list(argv), parser)
    with pytest.raises(SystemExit) as exit_:
        example.load_data(parser, args)
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--train-subset", "10"],
            "argument --train-subset: --train-subset 10 leaves class 0 with 0 training images, "
            "and the few-label probe needs 1 of each class",
        ),
        (
            ["--per-class", "3", "--probe-labels", "5"],
            "argument --probe-labels: --per-class 3 leaves class 0 with 3 training images, and "
            "the few-label probe needs 5 of each class",
        ),
        (
            ["--probe-labels", "151"],
            "argument --probe-labels: --data digits leaves class 7 with 144 training images",
        ),
        (["--data", "{tmp}/bad.npz"], "argument --data: {tmp}/bad.npz is not a readable .npz"),
        (["--data", "{tmp}/one.npz"], "holds one array, not a .npz archive of named arrays"),
        (
            ["--per-class", "999"],
            "argument --per-class: 999 is more than the 144 training images of class 7",
        ),
        (
            ["--batch-size", "2000"],
            "argument --batch-size: 2000 is more than the 1500 training images of --data digits",
        ),
        (
            ["--knn-k", "300", "--per-class", "20"],
            "argument --knn-k: 300 neighbours is more than the 200 training images of "
            "--per-class 20",
        ),
    ],
)
def test_values_that_do_not_fit_the_data_are_refused_before_the_model(
    capsys, tmp_path, argv, message
):
    (tmp_path / "bad.npz").write_text("x")
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert message.replace("{tmp}", str(tmp_path)) in data_refusal(capsys, *argv)


def test_values_that_fit_the_data_pass():
    parser = example.build_parser()
    args = example.parse_args(["--per-class", "20", "--knn-k", "200", "--batch-size", "200"])
    dataset = example.load_data(parser, args)
    assert len(dataset.y_train) == 200 and len(dataset.y_test) == 297


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


# -- the documented results are the committed ones ----------------------------------------------

RESULTS = ROOT / "examples" / "results"
LOSS_OF_ROW = {"SCE": "sce", "InfoNCE": "infonce", "ReSSL": "ressl", "CACR": "cacr", "ReCo": "reco"}


def committed(folder):
    return json.loads((RESULTS / folder / "summary.json").read_text())


def table(document, header):
    """The rows (lists of cells) of the Markdown table under ``header`` in ``document``."""
    lines = (ROOT / document).read_text().splitlines()
    start = lines.index(header) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    assert rows, header
    return rows


def value(cell):
    """A cell's number, and whether it carries the mark of a run before the untrained baseline."""
    return cell.rstrip(" †"), cell.endswith("†")


MAIN_JOB_HEADER = (
    "| main job (SCE, MoCo), seed | kNN top-1: trained (untrained) | one-label linear probe "
    "| linear probe on every label |"
)


def test_the_readme_main_job_table_is_the_committed_seeds_and_their_untrained_networks():
    """Each cell: the trained run's figure, then its untrained network's, which is also the
    committed --epochs 0 run of the same seed."""
    rows = table("README.md", MAIN_JOB_HEADER)
    assert [row[0] for row in rows] == ["0", "1", "2"]
    for seed, row in enumerate(rows):
        run, untrained = (
            committed(f"digits-sce-cpu-seed{seed}"),
            committed(f"digits-untrained-seed{seed}"),
        )
        assert (run["seed"], run["epochs"], run["loss"], run["width"]) == (seed, 20, "sce", 64)
        assert (untrained["seed"], untrained["epochs"], untrained["width"]) == (seed, 0, 64)
        assert run["untrained"] == untrained["untrained"]
        assert {k: untrained[k] for k in untrained["untrained"]} == untrained["untrained"]
        assert run["probe_labels"] == 1 and run["probe_draws"] == 20
        for cell, key in zip(row[1:], ("knn_top1", "few_label_top1", "linear_top1")):
            assert cell == f"{run[key]:.1f} ({run['untrained'][key]:.1f})", (seed, key)


LOSSES_HEADER = "| loss | MoCo: kNN | MoCo: linear | SimCLR: kNN | SimCLR: linear |"


def test_the_readme_losses_table_is_the_committed_runs():
    """Each cell is its run's figure; † marks exactly the runs without an untrained baseline."""
    rows = table("README.md", LOSSES_HEADER)
    assert [LOSS_OF_ROW[row[0].split()[0]] for row in rows] == list(LOSS_OF_ROW.values())
    for row in rows:
        loss = LOSS_OF_ROW[row[0].split()[0]]
        folders = [f"digits-{loss}-cpu", f"digits-simclr-{loss}-cpu"]
        for folder, cells in zip(folders, (row[1:3], row[3:5])):
            if loss == "reco" and "simclr" in folder:
                assert cells == ["—", "—"]  # ReCo needs the momentum encoder
                continue
            run = committed(folder)
            for cell, key in zip(cells, ("knn_top1", "linear_top1")):
                number, before_baseline = value(cell)
                assert number == f"{run[key]:.1f}", (folder, cell)
                assert before_baseline == ("untrained" not in run), (folder, cell)


STUDY_HEADER = (
    "| CIFAR-10 study, 3 seeds | kNN top-1 | one-label linear probe | linear probe on every label |"
)


def test_the_readme_cifar10_study_table_is_the_committed_runs_mean_and_spread():
    """Each cell: the mean ± standard deviation over the committed seeds, then the untrained
    networks' in brackets; the committed study table is what study_table.py makes of the runs."""
    runs = study_table.load_runs(RESULTS, "cifar10-*-w16-k1000-seed*")
    rows = table("README.md", STUDY_HEADER)
    assert [LOSS_OF_ROW[row[0].split()[0]] for row in rows] == ["sce", "infonce", "ressl"]
    for row in rows:
        found = runs[LOSS_OF_ROW[row[0].split()[0]]]
        assert [s["seed"] for s in found] == [0, 1, 2]
        for s in found:
            assert (s["data"], s["per_class"], s["width"], s["epochs"]) == ("cifar10", 1000, 16, 25)
            assert (s["framework"], s["probe_labels"], s["test_images"]) == ("moco", 1, 10000)
        for cell, key in zip(row[1:], ("knn_top1", "few_label_top1", "linear_top1")):
            trained = study_table.mean_std([s[key] for s in found])
            untrained = study_table.mean_std([s["untrained"][key] for s in found])
            assert cell == f"{trained} ({untrained})", (row[0], key)
    committed_table = (RESULTS / "cifar10-w16-k1000-study.md").read_text()
    assert committed_table == study_table.table(runs)


RUNS_HEADER = (
    "| run | kNN top-1 (untrained) | one-label linear probe (untrained) "
    "| linear probe on every label (untrained) | wall |"
)


def test_the_results_readme_study_rows_are_the_committed_runs():
    rows = table("examples/results/README.md", RUNS_HEADER)
    assert len(rows) == 9
    for row in rows:
        name, seed = row[0].rsplit(", seed ", 1)
        run = committed(f"cifar10-{LOSS_OF_ROW[name.split()[0]]}-w16-k1000-seed{seed}")
        for cell, key in zip(row[1:4], ("knn_top1", "few_label_top1", "linear_top1")):
            assert cell == f"{run[key]:.1f} ({run['untrained'][key]:.1f})", (row[0], key)
        assert row[4] == f"{run['wall_s']:.0f} s"


def test_every_committed_digits_run_has_its_command_summary_and_plot():
    folders = sorted(p for p in RESULTS.iterdir() if p.name.startswith("digits-"))
    names = {p.name for p in folders}
    assert {f"digits-{loss}-cpu" for loss in LOSS_OF_ROW.values()} <= names
    assert {f"digits-untrained-seed{seed}" for seed in (0, 1, 2)} <= names
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir() if p.name != "checkpoint.pt") == [
            "command.txt",
            "curves.png",
            "summary.json",
        ]
        summary = json.loads((folder / "summary.json").read_text())
        command = (folder / "command.txt").read_text()
        assert summary["data"] == "digits" and "the digits fallback" not in command
        assert "neither in data" not in summary.get("data_note", "")
        if "untrained" in summary:  # the runs since the untrained baseline: the main job's keys
            assert summary["width"] == 64
            assert sorted(summary["untrained"]) == sorted(example.METRIC_NAMES)
            words = command.split("#")[0].split()
            assert words[:2] == ["python", "examples/pretrain.py"]
            args = example.parse_args(words[2:])
            assert (args.loss, args.framework, args.seed, args.epochs) == (
                summary["loss"],
                summary["framework"],
                summary["seed"],
                summary["epochs"],
            )
            assert args.out == Path("examples/results") / folder.name


def test_the_readme_main_job_time_is_the_committed_runs():
    wall = committed("digits-sce-cpu-seed0")["wall_s"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"{wall:.0f} s (`examples/results/digits-sce-cpu-seed0/summary.json`)" in readme
