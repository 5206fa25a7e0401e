"""MoCo- or SimCLR-style self-supervised pretraining of a ResNet-18 with SCE, InfoNCE (MoCo v2,
NT-Xent), ReSSL, CACR or ReCo.

    python examples/pretrain.py                                   # default data, SCE recipe
    python examples/pretrain.py --data cifar10 --loss infonce --out runs/moco
    python examples/pretrain.py --loss cacr --out runs/cacr       # or --loss reco
    torchrun --nproc_per_node=4 examples/pretrain.py --data cifar10 --out runs/sce4
    python examples/pretrain.py --smoke --device cpu              # a 2-minute check, in runs/smoke

An online ResNet-18 (CIFAR stem) + projector 512-512(BN)-128 learns from a strong view; its EMA
(the momentum encoder) embeds a weak view into the target keys; a MemoryQueue of past keys holds
the negatives. CACR instead embeds two strong views with both encoders and attracts each online
view to the other view's key (its official multi-view form); ReCo adds to MoCo v2 (key from a
second strong view) a weak view whose keys fill a second queue, and a CutMix of the strong view
with a permuted key view, whose target is the interpolated key. Evaluation: a weighted kNN monitor
(k=200, t=0.1) and a final linear probe. Each epoch writes a checkpoint that ``--resume``
continues from, plus summary.json and curves.png, under ``--out``.

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
from sce_loss.relational import cacr_loss, interpolated_key, reco_loss  # noqa: E402

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


def parse_args(argv=None):
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
        type=int,
        default=2,
        help="CACR's views per image (the official CACR commands use 5)",
    )
    p.add_argument(
        "--data",
        default="digits",
        help="'digits' (scikit-learn's bundled digits: embedded, no download), 'cifar10' "
        "(torchvision, downloaded into --data-dir), a .npz or an ImageFolder path",
    )
    p.add_argument(
        "--data-dir", type=Path, default=Path("data"), help="where torchvision keeps CIFAR-10"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/pretrain, with --smoke runs/smoke)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="write no OUT/checkpoint.pt (about 139 MB for the ResNet-18, written every epoch)",
    )
    p.add_argument("--epochs", type=int, default=None, help="default 200 (20 on digits)")
    p.add_argument("--warmup-epochs", type=int, default=5)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="global batch, split over ranks; default 256 (64 on digits)",
    )
    p.add_argument("--lr", type=float, default=0.06)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument(
        "--momentum", type=float, default=0.99, help="EMA momentum of the target encoder"
    )
    p.add_argument(
        "--momentum-schedule",
        choices=["constant", "cosine"],
        default="constant",
        help="cosine: from --momentum to 1 over training",
    )
    p.add_argument("--queue-size", type=int, default=None, help="default 4096 (1024 on digits)")
    for name, meaning in HYPER_PARAMETER_HELP.items():
        losses = [loss for loss, defaults in LOSS_DEFAULTS.items() if name in defaults]
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=float,
            default=None,
            help=f"{meaning}; default per loss ({', '.join(losses)})",
        )
    p.add_argument(
        "--knn-every", type=int, default=10, help="kNN monitor every N epochs (and at the end)"
    )
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-t", type=float, default=0.1)
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--train-subset", type=int, default=None, help="use the first N training images")
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--steps-per-epoch", type=int, default=None, help="cap the steps of an epoch")
    p.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast (it is on for CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny preset for a CPU check: 2 epochs of 3 steps of 32 images on a subset",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch has no CUDA device (torch.cuda.is_available() is False)")
    if args.framework == "simclr" and args.loss == "reco":
        p.error("--loss reco needs the momentum encoder and queues of --framework moco")
    if args.views < 2:
        p.error(f"--views must be at least 2, got {args.views}")
    if args.views != 2 and args.loss != "cacr":
        p.error("--views applies to --loss cacr")
    given = [name for name in HYPER_PARAMETER_HELP if getattr(args, name) is not None]
    foreign = [name for name in given if name not in LOSS_DEFAULTS[args.loss]]
    if foreign:
        p.error(f"--{foreign[0].replace('_', '-')} does not apply to --loss {args.loss}")
    args.hyper_parameters = LOSS_DEFAULTS[args.loss] | {name: getattr(args, name) for name in given}
    if args.smoke:
        args.epochs, args.warmup_epochs = args.epochs or 2, 1
        args.batch_size, args.queue_size = 32, args.queue_size or 128
        args.steps_per_epoch, args.knn_every, args.probe_epochs = 3, 1, 5
        args.train_subset, args.test_subset = args.train_subset or 512, args.test_subset or 256
    if args.out is None:
        args.out = Path("runs/smoke" if args.smoke else "runs/pretrain")
    return args


class Encoder(nn.Module):
    """ResNet-18 backbone and projector 512-512(BN)-128; returns L2-normalised embeddings."""

    def __init__(self, out_dim=128):
        super().__init__()
        self.backbone = ResNet18()
        self.projector = nn.Sequential(
            nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, out_dim)
        )

    def forward(self, x):
        return F.normalize(self.projector(self.backbone(x)).float(), dim=1)


class Run:
    """One pretraining run: set-up, epochs, evaluation, checkpoints and summary."""

    def __init__(self, args):
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
        self.dataset = data.load(args.data, args.data_dir)
        ds = self.dataset
        if args.train_subset:
            ds.x_train, ds.y_train = (
                ds.x_train[: args.train_subset],
                ds.y_train[: args.train_subset],
            )
        if args.test_subset:
            ds.x_test, ds.y_test = ds.x_test[: args.test_subset], ds.y_test[: args.test_subset]
        for name, value in RECIPES["digits" if self.dataset.name == "digits" else "cifar"].items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        if args.batch_size % self.world:
            raise ValueError(
                f"--batch-size {args.batch_size} must be divisible by the {self.world} ranks"
            )
        self.images = self.dataset.x_train.to(self.device)  # uint8, augmented on the device
        self.steps_per_epoch = len(self.images) // args.batch_size
        if args.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, args.steps_per_epoch)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{len(self.images)} training images are fewer than one batch of {args.batch_size}"
            )

        online = Encoder().to(self.device, memory_format=torch.channels_last)
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
        bar = tqdm(
            range(self.steps_per_epoch),
            desc=f"epoch {self.epoch + 1}/{self.args.epochs}",
            disable=self.rank != 0,
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
        return result

    # -- checkpoints ----------------------------------------------------------------------------
    def _identity(self) -> dict:
        """What a checkpoint must share with the run that resumes it."""
        return dict(
            loss=self.args.loss,
            framework=self.args.framework,
            views=self.args.views,
            data=self.dataset.name,
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
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
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
        if self.epoch == 0 and self.rank == 0:  # the random-initialisation baseline of the curve
            self.history.append(dict(epoch=0, loss=None) | self.evaluate(probe=False))
            print(f"epoch 0: kNN top-1 {self.history[0]['knn_top1']:.2f}%", flush=True)
        while self.epoch < args.epochs:
            stats = self.train_epoch()
            self.epoch += 1
            self.train_seconds += stats["seconds"]
            last = self.epoch == args.epochs
            if self.rank == 0 and (self.epoch % args.knn_every == 0 or last):
                stats |= self.evaluate(probe=False)
                print(
                    f"epoch {self.epoch}: loss {stats['loss']:.4f}, "
                    f"kNN top-1 {stats['knn_top1']:.2f}%",
                    flush=True,
                )
            self.history.append(dict(epoch=self.epoch) | stats)
            if self.rank == 0 and not args.no_checkpoint:
                self._save(args.out / "checkpoint.pt")
            if self.world > 1:
                dist.barrier()
        summary = self.summary()
        if self.rank == 0:
            (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
            plot_curves(
                self.history,
                args.out / "curves.png",
                f"{args.loss} ({args.framework}) on {self.dataset.name}",
            )
            print(json.dumps(summary, indent=1), flush=True)
            print(
                "wrote "
                + ", ".join(
                    str(args.out / name)
                    for name in ("checkpoint.pt", "summary.json", "curves.png")
                    if name != "checkpoint.pt" or not args.no_checkpoint
                ),
                flush=True,
            )
        return summary

    def summary(self) -> dict:
        result = dict(
            loss=self.args.loss,
            framework=self.args.framework,
            views=self.args.views,
            hyper_parameters=self.hyper,
            data=self.dataset.name,
            epochs=self.epoch,
            batch_size=self.args.batch_size,
            queue_size=self.args.queue_size if self.args.framework == "moco" else None,
            world_size=self.world,
            seed=self.args.seed,
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
        if self.rank == 0:
            result |= self.evaluate(probe=True)
        return result


def plot_curves(history, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, loss_axis = plt.subplots(figsize=(7, 4))
    trained = [h for h in history if h["loss"] is not None]
    loss_axis.plot([h["epoch"] for h in trained], [h["loss"] for h in trained], color="tab:blue")
    loss_axis.set(xlabel="epoch", ylabel="training loss", title=title)
    knn = [(h["epoch"], h["knn_top1"]) for h in history if "knn_top1" in h]
    if knn:
        accuracy_axis = loss_axis.twinx()
        accuracy_axis.plot(*zip(*knn), "o-", color="tab:orange")
        accuracy_axis.set_ylabel("kNN top-1 (%)", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    args = parse_args(argv)
    try:
        return Run(args).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
