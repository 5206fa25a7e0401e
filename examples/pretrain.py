"""MoCo- or SimCLR-style self-supervised pretraining of a ResNet-18 with SCE, InfoNCE (MoCo v2,
NT-Xent), ReSSL, CACR or ReCo.

    python examples/pretrain.py                                   # default data, SCE recipe
    python examples/pretrain.py --data cifar10 --loss infonce --out runs/moco
    python examples/pretrain.py --loss cacr --out runs/cacr       # or --loss reco
    torchrun --nproc_per_node=4 examples/pretrain.py --data cifar10 --out runs/sce4
    python examples/pretrain.py --smoke --device cpu              # a short check, in runs/smoke

An online ResNet-18 (CIFAR stem) + projector 512-512(BN)-128 learns from a strong view; its EMA
(the momentum encoder) embeds a weak view into the target keys; a MemoryQueue of past keys holds
the negatives. CACR instead embeds two strong views with both encoders and attracts each online
view to the other view's key (its official multi-view form); ReCo adds to MoCo v2 (key from a
second strong view) a weak view whose keys fill a second queue, and a CutMix of the strong view
with a permuted key view, whose target is the interpolated key. Evaluation, on the untrained
network before the first step and again at the end: a weighted kNN monitor (k=200, t=0.1, also
every --knn-every epochs), a linear probe on one label per class and one on every label
(docs/example.md says why). Each epoch writes a checkpoint that --resume continues from;
summary.json and curves.png follow at the end, under --out.

Several processes (torchrun): each takes its shard of every global batch; the loss's queue is
pushed with every rank's keys, so all ranks hold one queue; on GPUs batch norm is SyncBatchNorm in
both encoders, so its statistics are those of the global batch, as on one device (without the
cross-rank shuffle that MoCo's shuffle-BN needs). On CPUs (gloo, a smoke path) it stays per rank.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import augment  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
from resnet import ResNet18  # noqa: E402

from sce_loss import MemoryQueue, info_nce_loss, ressl_loss, sce_loss  # noqa: E402
from sce_loss.functional import check_options  # noqa: E402
from sce_loss.relational import (  # noqa: E402
    cacr_loss,
    check_cacr_options,
    check_reco_options,
    interpolated_key,
    reco_loss,
)

# Per-loss hyper-parameters: SCE's CIFAR recipe, MoCo v2's, ReSSL's and ReCo's official values
# (main_reco.py: τ = 0.2, τ_s = 0.1, τ_t = 0.04, λ₁ = λ₂ = 1); CACR's, below.
LOSS_DEFAULTS = {
    "sce": dict(coeff=0.5, temperature=0.1, target_temperature=0.05),
    "infonce": dict(temperature=0.2),
    "ressl": dict(temperature=0.1, target_temperature=0.04),
    # CACR: the formula's neutral values. The official sources differ (JegZheng/CACR-SSL): the
    # queue code's main_ours.py defaults α = β = 3; its README command uses τ⁻ = 2, α = β = 1
    # and 5 views; the small-scale README uses τ⁻ = 0.9 on CIFAR-10. Every value is a flag.
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
        local_weight=1.0,
    ),
}
LOSS_FUNCTIONS = {
    "sce": sce_loss,
    "infonce": info_nce_loss,
    "ressl": ressl_loss,
    "cacr": cacr_loss,
    "reco": reco_loss,
}
HYPER_PARAMETER_HELP = {
    "coeff": "SCE's λ",
    "temperature": "τ",
    "target_temperature": "τ_m (ReCo: τ_t)",
    "relation_temperature": "ReCo's τ_s",
    "global_weight": "ReCo's λ₁",
    "local_weight": "ReCo's λ₂",
    "attraction_temperature": "CACR's τ⁺",
    "repulsion_temperature": "CACR's τ⁻",
    "attraction_weight": "CACR's α",
    "repulsion_weight": "CACR's β",
}
# Schedule defaults: SCE's CIFAR-10 recipe; the 1,500-image digits default gets more, smaller steps
# and a queue smaller than the dataset.
RECIPES = {
    "cifar": dict(epochs=200, batch_size=256, queue_size=4096),
    "digits": dict(epochs=20, batch_size=64, queue_size=1024),
}
DEFAULTS = dict(warmup_epochs=5, knn_every=10, probe_epochs=100, width=64)
# --smoke: a short CPU check of every part; each value yields to its flag when given.
SMOKE = dict(
    width=16,
    epochs=2,
    warmup_epochs=1,
    batch_size=32,
    queue_size=128,
    steps_per_epoch=3,
    knn_every=1,
    probe_epochs=5,
    train_subset=512,
    test_subset=256,
)
# The reported evaluations, by their summary.json key (docs/example.md says why these three).
METRIC_NAMES = {
    "knn_top1": "kNN top-1",
    "few_label_top1": "linear probe on {labels} per class",
    "linear_top1": "linear probe on every label",
}
LOSS_NAMES = {"sce": "SCE", "infonce": "InfoNCE", "ressl": "ReSSL", "cacr": "CACR", "reco": "ReCo"}
FRAMEWORKS = {"moco": "MoCo", "simclr": "SimCLR"}
LOSS_CHECKS = {"cacr": check_cacr_options, "reco": check_reco_options}
RUN_FILES = ("checkpoint.pt", "checkpoint.tmp", "summary.json", "curves.png")


def _number(convert, accept, requirement: str):
    """An argparse ``type``: ``convert`` the text, and refuse values that ``accept`` rejects."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    return parse


POSITIVE_INT = _number(int, lambda v: v > 0, "a positive integer")
COUNT = _number(int, lambda v: v >= 0, "an integer ≥ 0")
SEED = _number(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
VIEWS = _number(int, lambda v: v >= 2, "an integer ≥ 2")
POSITIVE = _number(float, lambda v: 0 < v < math.inf, "a finite number > 0")
NON_NEGATIVE = _number(float, lambda v: 0 <= v < math.inf, "a finite number ≥ 0")
FRACTION = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--loss", choices=list(LOSS_DEFAULTS), default="sce")
    p.add_argument(
        "--framework",
        choices=["moco", "simclr"],
        default="moco",
        help="moco: online strong view against a momentum encoder's key and a queue; simclr: "
        "two strong views through the one online encoder, in-batch (symmetric) loss",
    )
    p.add_argument(
        "--views",
        type=VIEWS,
        default=2,
        help="CACR's views per image (the official CACR commands use 5)",
    )
    p.add_argument(
        "--width", type=POSITIVE_INT, help="ResNet-18's base channels (default 64, with --smoke 16)"
    )
    p.add_argument(
        "--data",
        default="digits",
        help="'digits' (scikit-learn's bundled digits: embedded, no download), 'cifar10' "
        f"({data.CIFAR10_PACK} in --data-dir, else torchvision's), a .npz or an ImageFolder path",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("SCE_LOSS_DATA_DIR", "data")),
        help=f"where CIFAR-10 is: {data.CIFAR10_PACK} or torchvision's download (default "
        "$SCE_LOSS_DATA_DIR, else data)",
    )
    p.add_argument(
        "--per-class",
        type=POSITIVE_INT,
        default=None,
        help="train on the first K training images of each class, in the dataset's order",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/pretrain, with --smoke runs/smoke); one that holds "
        "files is refused without --resume or --overwrite",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out that holds a run, deleting its checkpoint, summary and plot",
    )
    p.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="write no OUT/checkpoint.pt (about 139 MB at width 64, written every epoch)",
    )
    p.add_argument("--epochs", type=COUNT, default=None, help="default 200 (20 on digits)")
    p.add_argument("--warmup-epochs", type=COUNT, default=None, help="default 5")
    p.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        default=None,
        help="global batch, split over ranks; default 256 (64 on digits)",
    )
    p.add_argument("--lr", type=POSITIVE, default=0.06)
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=5e-4)
    p.add_argument(
        "--momentum", type=FRACTION, default=0.99, help="EMA momentum of the target encoder"
    )
    p.add_argument(
        "--momentum-schedule",
        choices=["constant", "cosine"],
        default="constant",
        help="cosine: from --momentum to 1 over training",
    )
    p.add_argument(
        "--queue-size", type=POSITIVE_INT, default=None, help="default 4096 (1024 on digits)"
    )
    for name, meaning in HYPER_PARAMETER_HELP.items():
        losses = [loss for loss, defaults in LOSS_DEFAULTS.items() if name in defaults]
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=float,
            default=None,
            help=f"{meaning}; default per loss ({', '.join(losses)})",
        )
    p.add_argument(
        "--knn-every",
        type=POSITIVE_INT,
        default=None,
        help="kNN monitor every N epochs (and at the end); default 10",
    )
    p.add_argument("--knn-k", type=POSITIVE_INT, default=200)
    p.add_argument("--knn-t", type=POSITIVE, default=0.1)
    p.add_argument(
        "--probe-epochs",
        type=POSITIVE_INT,
        default=None,
        help="epochs of the linear probe on every training label; default 100",
    )
    p.add_argument(
        "--probe-labels",
        type=POSITIVE_INT,
        default=1,
        help="labelled training images per class of the few-label probe",
    )
    p.add_argument(
        "--probe-draws",
        type=POSITIVE_INT,
        default=20,
        help="draws of those labelled images the few-label probe averages over",
    )
    p.add_argument(
        "--train-subset", type=POSITIVE_INT, default=None, help="use the first N training images"
    )
    p.add_argument("--test-subset", type=POSITIVE_INT, default=None)
    p.add_argument(
        "--steps-per-epoch", type=POSITIVE_INT, default=None, help="cap the steps of an epoch"
    )
    p.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast (it is on for CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny preset for a CPU check (2 epochs of 3 steps of 32 images on a 512-image "
        "subset); a flag given beside it wins",
    )
    return p


def parse_args(argv=None, parser=None):
    """The checked arguments, defaults resolved: any bad value is refused here, before any data
    is read or any model built."""
    p = parser or build_parser()
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch has no CUDA device (torch.cuda.is_available() is False)")
    if args.framework == "simclr" and args.loss == "reco":
        p.error("--loss reco needs the momentum encoder and queues of --framework moco")
    if args.views != 2 and args.loss != "cacr":
        p.error("--views applies to --loss cacr")
    if args.data not in ("digits", "cifar10"):
        path = Path(args.data)
        if not (path.suffix == ".npz" and path.is_file()) and not path.is_dir():
            what = "a file, not a .npz" if path.is_file() else "no such file or folder"
            p.error(
                f"argument --data: expected 'digits', 'cifar10', a .npz file or an ImageFolder "
                f"directory; {args.data!r} is none of these ({what})"
            )
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out and --overwrite replaces it: give one")
    if args.per_class and args.train_subset:
        p.error("--per-class and --train-subset both choose the training images: give one")
    given = [name for name in HYPER_PARAMETER_HELP if getattr(args, name) is not None]
    foreign = [name for name in given if name not in LOSS_DEFAULTS[args.loss]]
    if foreign:
        p.error(f"--{foreign[0].replace('_', '-')} does not apply to --loss {args.loss}")
    check = LOSS_CHECKS.get(args.loss, check_options)
    for name in given:  # the library's own checks, each named by its flag
        try:
            check(**{name: getattr(args, name)})
        except (ValueError, TypeError) as error:
            p.error(f"argument --{name.replace('_', '-')}: {error}")
    args.hyper_parameters = LOSS_DEFAULTS[args.loss] | {name: getattr(args, name) for name in given}
    presets = [SMOKE] if args.smoke else []
    presets += [RECIPES["digits" if args.data == "digits" else "cifar"], DEFAULTS]
    for preset in presets:
        for name, value in preset.items():
            if getattr(args, name) is None and not (name == "train_subset" and args.per_class):
                setattr(args, name, value)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        p.error(f"argument --batch-size: {args.batch_size} must be divisible by the {world} ranks")
    if args.out is None:
        args.out = Path("runs/smoke" if args.smoke else "runs/pretrain")
    return args


def load_data(parser, args) -> data.Dataset:
    """The training and test images the arguments choose, and the flags that depend on them
    checked against them (argparse's error naming the flag), before any model is built."""
    try:
        dataset = data.load(args.data, args.data_dir, args.per_class)
    except ValueError as error:  # data.py's messages name their flag: argparse's format
        parser.error(f"argument {error}")
    classes = int(dataset.y_train.max()) + 1  # before a subset can leave a class out
    if args.train_subset:
        dataset.x_train = dataset.x_train[: args.train_subset]
        dataset.y_train = dataset.y_train[: args.train_subset]
    if args.test_subset:
        dataset.x_test = dataset.x_test[: args.test_subset]
        dataset.y_test = dataset.y_test[: args.test_subset]
    images, counts = len(dataset.y_train), torch.bincount(dataset.y_train, minlength=classes)
    chosen_by = (
        f"--train-subset {args.train_subset}" if args.train_subset else f"--data {args.data}"
    )
    if args.per_class:
        chosen_by = f"--per-class {args.per_class}"
    fewest, smallest = int(counts.min()), int(counts.argmin())
    if fewest < args.probe_labels:
        # Blame the flag that chose the images, unless --probe-labels was given beside the data.
        blamed = "--train-subset" if args.train_subset else "--per-class" if args.per_class else ""
        if not blamed or args.probe_labels > 1:
            blamed = "--probe-labels"
        parser.error(
            f"argument {blamed}: {chosen_by} leaves class {smallest} with {fewest} training "
            f"image{'s' * (fewest != 1)}, and the few-label probe needs {args.probe_labels} of "
            "each class"
        )
    if args.batch_size > images:
        parser.error(
            f"argument --batch-size: {args.batch_size} is more than the {images} training images "
            f"of {chosen_by}"
        )
    if args.knn_k > images:
        parser.error(
            f"argument --knn-k: {args.knn_k} neighbours is more than the {images} training "
            f"images of {chosen_by}"
        )
    return dataset


def check_output(parser, args) -> None:
    """Refuse an --out that holds files unless --resume (which needs its checkpoint) or
    --overwrite says what to do with them."""
    out = args.out
    if out.exists() and not out.is_dir():
        parser.error(f"argument --out: {out} is a file, not a folder")
    if args.resume:
        if not (out / "checkpoint.pt").is_file():
            parser.error(f"--resume: no checkpoint at {out / 'checkpoint.pt'}")
        return
    if args.overwrite:
        return
    if out.is_dir() and any(out.iterdir()):
        held = ", ".join(sorted(path.name for path in out.iterdir())[:5])
        parser.error(
            f"argument --out: {out} already holds files ({held}); pass --resume to continue its "
            "run, --overwrite to start afresh there, or another --out"
        )


def clear_previous_run(args) -> None:
    """With --overwrite, delete the previous run's checkpoint, summary and plot (rank 0), once
    every check has passed."""
    if args.overwrite and int(os.environ.get("RANK", 0)) == 0:
        for name in RUN_FILES:
            (args.out / name).unlink(missing_ok=True)


def describe(results: dict, probe_labels: int, untrained: dict | None = None) -> str:
    """'kNN top-1 83.8%, ...' for every ``*_top1`` result, each untrained figure beside it."""
    labels = f"{probe_labels} label{'s' * (probe_labels > 1)}"
    parts = []
    for key, name in METRIC_NAMES.items():
        if key in results:
            before = f" (untrained {untrained[key]:.1f}%)" if untrained else ""
            parts.append(f"{name.format(labels=labels)} {results[key]:.1f}%{before}")
    return ", ".join(parts)


class Encoder(nn.Module):
    """ResNet-18 backbone (8 × width features) and projector to 512 (BN) then 128; returns
    L2-normalised embeddings."""

    def __init__(self, width=64, out_dim=128):
        super().__init__()
        self.backbone = ResNet18(width)
        self.projector = nn.Sequential(
            nn.Linear(self.backbone.feature_dim, 512, bias=False),
            nn.BatchNorm1d(512),
            nn.ReLU(),
            nn.Linear(512, out_dim),
        )

    def forward(self, x):
        return F.normalize(self.projector(self.backbone(x)).float(), dim=1)


class Run:
    """One pretraining run: set-up, epochs, evaluation, checkpoints and summary."""

    def __init__(self, args, dataset: data.Dataset):
        self.args = args
        self.rank, self.world = _init_distributed(args.device)
        self.device = (
            torch.device("cuda", _local_rank()) if args.device == "cuda" else torch.device("cpu")
        )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        _seed_everything(args.seed + self.rank)
        self.amp = self.device.type == "cuda" and not args.no_amp
        self.dataset = dataset
        self.images = dataset.x_train.to(self.device)  # uint8, augmented on the device
        self.steps_per_epoch = len(self.images) // args.batch_size
        if args.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, args.steps_per_epoch)

        online = Encoder(args.width).to(self.device, memory_format=torch.channels_last)
        if self.world > 1 and self.device.type == "cuda":  # SyncBatchNorm runs on GPUs only
            online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
        self.target = copy.deepcopy(online).requires_grad_(False)
        self.online = (
            nn.parallel.DistributedDataParallel(
                online, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            if self.world > 1
            else online
        )
        self.queue = MemoryQueue(args.queue_size, 128, device=self.device)
        # ReCo's second queue holds the weak view's keys (its own initial vectors: another seed).
        self.weak_queue = (
            MemoryQueue(args.queue_size, 128, device=self.device, seed=1)
            if args.loss == "reco"
            else None
        )
        self.optimizer = torch.optim.SGD(
            online.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay
        )
        self.forward_online = torch.compile(self.online) if args.compile else self.online
        self.forward_target = torch.compile(self.target) if args.compile else self.target
        self.hyper = args.hyper_parameters
        if args.framework == "simclr":
            self.loss_step = self._simclr_loss
        else:
            self.loss_step = {"cacr": self._cacr_loss, "reco": self._reco_loss}.get(
                args.loss, self._moco_loss
            )
        # Batch order: the same on every rank (each takes its shard); augmentation: per rank. Both
        # are re-seeded from (seed, epoch, rank) each epoch, so a resumed run draws the same
        # numbers.
        self.order_generator = torch.Generator(device=self.device)
        self.augment_generator = torch.Generator(device=self.device)
        self.epoch, self.history, self.train_seconds = 0, [], 0.0
        self.untrained = None  # the evaluation before the first step, kept by the checkpoint
        args.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            print(f"output folder: {args.out.resolve()}", flush=True)
        if args.resume:
            self._load(args.out / "checkpoint.pt")

    # -- schedules ------------------------------------------------------------------------------
    def _lr(self, step: int) -> float:
        warmup = self.args.warmup_epochs * self.steps_per_epoch
        total = self.args.epochs * self.steps_per_epoch
        if step < warmup:
            return self.args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return self.args.lr * 0.5 * (1 + math.cos(math.pi * progress))

    def _ema_momentum(self, step: int) -> float:
        if self.args.momentum_schedule == "constant":
            return self.args.momentum
        total = self.args.epochs * self.steps_per_epoch
        return 1 - (1 - self.args.momentum) * (math.cos(math.pi * step / total) + 1) / 2

    # -- training -------------------------------------------------------------------------------
    def train_epoch(self) -> dict:
        from tqdm import tqdm

        self.online.train()
        self.target.train()
        local = self.args.batch_size // self.world
        seed = self.args.seed * 1_000_003 + self.epoch
        self.order_generator.manual_seed(seed)
        self.augment_generator.manual_seed(seed * 1009 + self.rank + 1)
        order = torch.randperm(len(self.images), device=self.device, generator=self.order_generator)
        bar = tqdm(  # a progress bar on a terminal only; run() prints a line per epoch
            range(self.steps_per_epoch),
            desc=f"epoch {self.epoch + 1}/{self.args.epochs}",
            disable=self.rank != 0 or not sys.stderr.isatty(),
            dynamic_ncols=True,
            mininterval=1.0,
        )
        total_loss = torch.zeros((), device=self.device)
        start = time.perf_counter()
        for i in bar:
            step = self.epoch * self.steps_per_epoch + i
            start_of_shard = i * self.args.batch_size + self.rank * local
            batch = order[start_of_shard : start_of_shard + local]
            loss = self.train_step(self.images[batch], step)
            total_loss += loss.detach()
            if self.rank == 0 and (i % 10 == 0 or i == self.steps_per_epoch - 1):
                seen = (i + 1) * self.args.batch_size
                bar.set_postfix(
                    loss=f"{loss.item():.3f}",
                    lr=f"{self._lr(step):.4f}",
                    img_s=f"{seen / (time.perf_counter() - start):.0f}",
                )
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if self.world > 1:
            dist.all_reduce(total_loss)
            total_loss /= self.world
        return dict(
            loss=total_loss.item() / self.steps_per_epoch,
            seconds=seconds,
            images_per_s=self.steps_per_epoch * self.args.batch_size / seconds,
        )

    def train_step(self, images_uint8, step: int) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(step)
        if self.args.framework == "moco":
            with torch.no_grad():
                momentum = self._ema_momentum(step)
                online = self.online.module if self.world > 1 else self.online
                torch._foreach_lerp_(
                    list(self.target.parameters()), list(online.parameters()), 1 - momentum
                )
        loss, pushes = self.loss_step(images_uint8)  # the loss reads the queues...
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        for queue, keys in pushes:  # ...then this batch's keys join them
            queue.push(keys)
        return loss

    def _view(self, kind: str, images_uint8) -> torch.Tensor:
        """A "strong" or "weak" augmentation of the batch, channels-last."""
        view = getattr(augment, kind)(images_uint8, self.augment_generator)
        return view.contiguous(memory_format=torch.channels_last)

    def _embed(self, encoder, *views) -> tuple[torch.Tensor, ...]:
        """The embeddings of each view, each view in its own forward pass, so that batch-norm
        statistics are per view, as in the official SCE, MoCo, SimCLR, CACR and ReCo codes."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return tuple(encoder(view) for view in views)

    def _moco_loss(self, images_uint8):
        """SCE, InfoNCE, ReSSL: the online strong view against the target weak view's key."""
        strong, weak = self._view("strong", images_uint8), self._view("weak", images_uint8)
        with torch.no_grad():
            (key,) = self._embed(self.forward_target, weak)
        (query,) = self._embed(self.forward_online, strong)
        loss_fn = LOSS_FUNCTIONS[self.args.loss]
        return loss_fn(query, key, self.queue.keys, **self.hyper), [(self.queue, key)]

    def _simclr_loss(self, images_uint8):
        """The SimCLR family: two strong views (``--views`` for CACR) through the one online
        encoder; SCE, InfoNCE (NT-Xent) and ReSSL in their symmetric form, CACR's one-encoder
        form. No momentum encoder, no queue."""
        views = [self._view("strong", images_uint8) for _ in range(self.args.views)]
        embeddings = self._embed(self.forward_online, *views)
        if self.args.loss == "cacr":
            return cacr_loss(torch.stack(embeddings), **self.hyper), []
        loss_fn = LOSS_FUNCTIONS[self.args.loss]
        return loss_fn(*embeddings, symmetric=True, gather=True, **self.hyper), []

    def _cacr_loss(self, images_uint8):
        """CACR's multi-view form: ``--views`` strong views through both encoders; each online
        view is attracted to the other views' keys; the last view's keys join the queue
        (official)."""
        views = [self._view("strong", images_uint8) for _ in range(self.args.views)]
        with torch.no_grad():
            keys = torch.stack(self._embed(self.forward_target, *views))
        queries = torch.stack(self._embed(self.forward_online, *views))
        return cacr_loss(queries, keys, self.queue.keys, **self.hyper), [(self.queue, keys[-1])]

    def _reco_loss(self, images_uint8):
        """ReCo: MoCo v2's two strong views, a weak view for the relation target, and a CutMix of
        the strong view with a permuted key view, whose target is the interpolated key."""
        strong, key_view, weak = (
            self._view(kind, images_uint8) for kind in ("strong", "strong", "weak")
        )
        partner = torch.randperm(
            len(images_uint8), device=self.device, generator=self.augment_generator
        )
        mixed, ratio = augment.cutmix(strong, key_view[partner], self.augment_generator)
        with torch.no_grad():
            key, weak_key = self._embed(self.forward_target, key_view, weak)
        query, mixed_query = self._embed(self.forward_online, strong, mixed)
        loss = reco_loss(
            query,
            key,
            self.queue.keys,
            weak_key=weak_key,
            weak_queue=self.weak_queue.keys,
            mixed_query=mixed_query,
            mixed_key=interpolated_key(query, key, partner, ratio),
            **self.hyper,
        )
        return loss, [(self.queue, key), (self.weak_queue, weak_key)]

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, probe: bool) -> dict:
        backbone = (self.online.module if self.world > 1 else self.online).backbone
        ds = self.dataset
        train_f = evaluate.features(backbone, ds.x_train, self.device, autocast=self.amp)
        test_f = evaluate.features(backbone, ds.x_test, self.device, autocast=self.amp)
        train_y, test_y = ds.y_train.to(self.device), ds.y_test.to(self.device)
        result = dict(
            knn_top1=evaluate.knn_top1(
                train_f, train_y, test_f, test_y, ds.classes, self.args.knn_k, self.args.knn_t
            )
        )
        if probe:
            result["linear_top1"] = evaluate.linear_probe_top1(
                train_f, train_y, test_f, test_y, ds.classes, self.args.probe_epochs
            )
            result["few_label_top1"] = evaluate.few_label_probe_top1(
                train_f, train_y, test_f, test_y, self.args.probe_labels, self.args.probe_draws
            )
        return result

    # -- checkpoints ----------------------------------------------------------------------------
    def _identity(self) -> dict:
        """What a checkpoint must share with the run that resumes it."""
        return dict(
            loss=self.args.loss,
            framework=self.args.framework,
            views=self.args.views,
            width=self.args.width,
            data=self.dataset.name,
            train_images=len(self.dataset.y_train),
            queue_size=self.args.queue_size,
        )

    def _save(self, path: Path) -> None:
        online = self.online.module if self.world > 1 else self.online
        state = dict(
            online=online.state_dict(),
            target=self.target.state_dict(),
            queue=self.queue.state_dict(),
            optimizer=self.optimizer.state_dict(),
            epoch=self.epoch,
            history=self.history,
            untrained=self.untrained,
            train_seconds=self.train_seconds,
            args=vars(self.args),
            run=self._identity(),
            rng=dict(
                torch=torch.get_rng_state(),
                numpy=np.random.get_state(),
                python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            ),
        )
        if self.weak_queue is not None:
            state["weak_queue"] = self.weak_queue.state_dict()
        torch.save(state, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)

    def _load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        saved = state.get("run") or {name: state["args"][name] for name in ("loss", "queue_size")}
        here = self._identity()
        differences = [
            f"{name} {saved[name]!r} there, {here[name]!r} here"
            for name in here
            if name in saved and saved[name] != here[name]
        ]
        if differences:
            raise ValueError(
                f"--resume: the checkpoint {path} is from another run "
                f"({'; '.join(differences)}); resume with its settings, or start "
                "afresh in another --out"
            )
        online = self.online.module if self.world > 1 else self.online
        try:
            online.load_state_dict(state["online"])
            self.target.load_state_dict(state["target"])
            self.queue.load_state_dict(state["queue"])
            if self.weak_queue is not None:
                self.weak_queue.load_state_dict(state["weak_queue"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise ValueError(
                f"--resume: the checkpoint {path} does not fit this run: "
                f"{' '.join(str(error).split())[:500]}"
            ) from None
        self.epoch, self.history = state["epoch"], state["history"]
        self.untrained = state.get("untrained")
        self.train_seconds = state["train_seconds"]
        torch.set_rng_state(state["rng"]["torch"].cpu())
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        if self.rank == 0:
            print(f"resumed from {path} after epoch {self.epoch}", flush=True)

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict:
        args = self.args
        if self.epoch == 0 and self.rank == 0:  # the untrained network, under the same protocol
            self.untrained = self.evaluate(probe=True)
            self.history.append(dict(epoch=0, loss=None, knn_top1=self.untrained["knn_top1"]))
            print(f"untrained: {describe(self.untrained, args.probe_labels)}", flush=True)
        start, first = time.perf_counter(), self.epoch
        while self.epoch < args.epochs:
            stats = self.train_epoch()
            self.epoch += 1
            self.train_seconds += stats["seconds"]
            last = self.epoch == args.epochs
            if self.rank == 0 and (self.epoch % args.knn_every == 0 or last):
                stats |= self.evaluate(probe=False)
            self.history.append(dict(epoch=self.epoch) | stats)
            if self.rank == 0:
                per_epoch = (time.perf_counter() - start) / (self.epoch - first)
                print(
                    f"epoch {self.epoch}/{args.epochs}: loss {stats['loss']:.4f}, "
                    f"{stats['images_per_s']:.0f} img/s"
                    + (f", kNN top-1 {stats['knn_top1']:.1f}%" if "knn_top1" in stats else "")
                    + f", ETA {_duration(per_epoch * (args.epochs - self.epoch))}",
                    flush=True,
                )
                if not args.no_checkpoint:
                    self._save(args.out / "checkpoint.pt")
            if self.world > 1:
                dist.barrier()
        summary = self.summary()
        if self.rank == 0:
            (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
            plot_curves(
                self.history,
                args.out / "curves.png",
                f"{LOSS_NAMES[args.loss]} ({FRAMEWORKS[args.framework]}) on {self.dataset.name}",
            )
            print(self.closing_sentence(summary), flush=True)
        return summary

    def closing_sentence(self, summary: dict) -> str:
        """What was trained, on what, with what results beside the untrained network's, and
        where the files are."""
        args, ds = self.args, self.dataset
        hyper = ", ".join(f"{name}={value:g}" for name, value in self.hyper.items())
        data_ = f"{ds.name} ({len(ds.y_train):,} training images, {len(ds.y_test):,} test images)"
        files = [name for name in RUN_FILES if (args.out / name).is_file()]
        if self.epoch:
            done = (
                f"Trained a ResNet-18 (width {args.width}) {FRAMEWORKS[args.framework]}-style "
                f"with {LOSS_NAMES[args.loss]} ({hyper}) for {self.epoch} "
                f"epoch{'' if self.epoch == 1 else 's'} on {data_}: "
                f"{describe(summary, args.probe_labels, summary['untrained'])}"
            )
        else:
            done = (
                f"Evaluated an untrained ResNet-18 (width {args.width}) on {data_}: "
                f"{describe(summary, args.probe_labels)}"
            )
        return f"{done}. Files in {args.out}: {', '.join(files)}."

    def summary(self) -> dict:
        result = dict(
            loss=self.args.loss,
            framework=self.args.framework,
            views=self.args.views,
            width=self.args.width,
            hyper_parameters=self.hyper,
            data=self.dataset.name,
            per_class=self.args.per_class,
            train_images=len(self.dataset.y_train),
            test_images=len(self.dataset.y_test),
            epochs=self.epoch,
            batch_size=self.args.batch_size,
            queue_size=self.args.queue_size if self.args.framework == "moco" else None,
            world_size=self.world,
            seed=self.args.seed,
            probe_labels=self.args.probe_labels,
            probe_draws=self.args.probe_draws,
            final_train_loss=self.history[-1]["loss"] if self.history else None,
            wall_s=round(self.train_seconds, 1),
            images_per_s=round(
                self.epoch
                * self.steps_per_epoch
                * self.args.batch_size
                / max(self.train_seconds, 1e-9),
                1,
            ),
            device=(
                torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
            ),
            torch=torch.__version__,
            amp_bf16=self.amp,
            compiled=self.args.compile,
        )
        if self.world > 1:
            result["queue_identical_across_ranks"] = _identical_across_ranks(self.queue.keys)
        if self.rank == 0:  # after no epoch, the network is the untrained one
            result |= self.evaluate(probe=True) if self.epoch else self.untrained
            result["untrained"] = self.untrained
            result["history"] = self.history
        return result


def plot_curves(history, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = curves_figure(history, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves_figure(history, title: str):
    """Training loss (left axis) and kNN top-1 (right axis, epoch 0 the untrained network) per
    epoch, each axis coloured as its line, with a legend and whole-epoch ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.set(xlabel="epoch", title=title)
    epochs = [h["epoch"] for h in history]
    loss_axis.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    loss_axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    lines = []
    trained = [(h["epoch"], h["loss"]) for h in history if h["loss"] is not None]
    if trained:
        lines += loss_axis.plot(*zip(*trained), color="tab:blue", label="training loss")
        _colour_axis(loss_axis, "training loss", "tab:blue")
    else:  # an untrained run (--epochs 0): no loss to scale an axis by
        loss_axis.set_yticks([])
    knn = [(h["epoch"], h["knn_top1"]) for h in history if "knn_top1" in h]
    if knn:
        accuracy_axis = loss_axis.twinx()
        label = "kNN top-1 (epoch 0: untrained)"
        lines += accuracy_axis.plot(*zip(*knn), "o-", color="tab:orange", label=label)
        _colour_axis(accuracy_axis, "kNN top-1 (%)", "tab:orange")
    if lines:
        # below the axes, where no curve runs
        loss_axis.legend(
            handles=lines, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False
        )
    fig.tight_layout()
    return fig


def _colour_axis(axis, label: str, colour: str) -> None:
    axis.set_ylabel(label, color=colour)
    axis.tick_params(axis="y", colors=colour)


def _duration(seconds: float) -> str:
    """'42 s', '3 min 05 s' or '1 h 02 min'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def _init_distributed(device: str) -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return 0, 1
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _identical_across_ranks(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv=None) -> dict:
    parser = build_parser()
    args = parse_args(argv, parser)
    check_output(parser, args)
    dataset = load_data(parser, args)
    clear_previous_run(args)
    try:
        return Run(args, dataset).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
