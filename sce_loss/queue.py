"""MemoryQueue: a ring buffer of past keys, the negatives of MoCo-style training."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .arguments import FLOAT_DTYPES, check_count, check_finite, check_float_tensor, check_labels


class MemoryQueue(nn.Module):
    """A first-in first-out bank of ``size`` keys of dimension ``dim``, kept as persistent buffers
    (saved in ``state_dict``). It starts filled with random unit vectors, as in MoCo, drawn from a
    private generator seeded with ``seed``, so every rank starts with the same queue.

    Use it in MoCo order: the loss reads ``queue.keys`` (all ``size`` entries), then
    ``queue.push(key)`` overwrites the oldest entries. Any batch size works: writes wrap around the
    end. ``push`` updates the buffer in place; the losses read the queue when they are called, so a
    push before the backward (the official MoCo code enqueues inside ``forward``) changes nothing.
    Under torch.distributed (``gather=True`` or a process group), ``push`` enqueues the keys of
    every rank in rank order, so all ranks hold the same queue.

    With ``labels=True`` it keeps a label beside each key (``queue.labels``, (size,) long, saved
    in ``state_dict`` and gathered like the keys): ``push(keys, labels)``, and the losses take
    ``queue_labels=queue.labels``. The initial random keys carry the label −1, which matches no
    row (labels are ≥ 0).
    """

    keys: Tensor  # (size, dim), the entries
    pointer: Tensor  # (), a long: where the next push writes
    labels: Tensor | None  # (size,) long, each entry's label, with labels=True

    def __init__(
        self,
        size: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        *,
        device: torch.device | str | None = None,
        gather: bool | torch.distributed.ProcessGroup = True,
        seed: int = 0,
        labels: bool = False,
    ) -> None:
        super().__init__()
        size, dim = check_count("size", size, low=1), check_count("dim", dim, low=1)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
        seed = check_count("seed", seed, low=-(1 << 63))
        distributed.resolve_group(gather)  # a TypeError for anything but a bool or a group
        self.gather = gather
        generator = torch.Generator().manual_seed(seed)
        initial = F.normalize(torch.randn(size, dim, generator=generator), dim=1).to(device, dtype)
        self.register_buffer("keys", initial)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long, device=device))
        if not isinstance(labels, (bool, np.bool_)):
            raise TypeError(f"labels must be a bool, got {type(labels).__name__}")
        unlabelled = torch.full((size,), -1, dtype=torch.long, device=device)
        self.register_buffer("labels", unlabelled if labels else None)

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def push(self, keys: Tensor, labels: Tensor | None = None) -> None:
        """Enqueue ``keys`` (B, dim), and their ``labels`` (B,) in a labelled queue, every rank's
        when distributed, over the oldest entries."""
        check_float_tensor("keys", keys)
        if keys.dim() != 2 or keys.shape[1] != self.keys.shape[1]:
            raise ValueError(
                f"keys must be (B, {self.keys.shape[1]}), got shape {tuple(keys.shape)}"
            )
        if keys.device != self.keys.device:
            raise ValueError(
                f"keys must be on the queue's device {self.keys.device}, got {keys.device}"
            )
        check_finite(keys=keys)  # as the losses' inputs
        if (labels is None) != (self.labels is None):
            raise ValueError(
                "this queue keeps a label per key: push(keys, labels)"
                if labels is None
                else "labels: this queue keeps none; build it with MemoryQueue(..., labels=True)"
            )
        if labels is not None:
            check_labels(labels, keys.shape[0], self.keys.device)
        group = distributed.resolve_group(self.gather)
        if group is not None:
            keys = distributed.all_gather_constant(keys.detach(), group)
            if labels is not None:
                labels = distributed.all_gather_constant(labels, group)
        pushed = keys.shape[0]
        # A copy: the keys may be a view of the queue itself (a re-push of its own entries).
        kept = keys.detach()[-self.size :].to(dtype=self.keys.dtype, copy=True)
        # As if pushed one by one: key t lands at (pointer + t) % size, later ones overwriting.
        first = self.pointer + (pushed - kept.shape[0])
        index = (first + torch.arange(kept.shape[0], device=self.keys.device)) % self.size
        self.keys.index_copy_(0, index, kept)
        if self.labels is not None and labels is not None:
            self.labels.index_copy_(0, index, labels[-self.size :].to(torch.long))
        self.pointer.add_(pushed).remainder_(self.size)

    def extra_repr(self) -> str:
        labelled = ", labels=True" if self.labels is not None else ""
        return f"size={self.size}, dim={self.keys.shape[1]}, dtype={self.keys.dtype}{labelled}"
