"""sce-loss: exact and fast self-supervised contrastive losses for PyTorch: SCE, InfoNCE, ReSSL,
CACR and ReCo."""

from .functional import info_nce_loss, ressl_loss, sce_loss
from .modules import CACRLoss, InfoNCELoss, ReCoLoss, ReSSLLoss, SCELoss
from .neighbours import nearest_neighbours
from .queue import MemoryQueue
from .relational import cacr_loss, interpolated_key, reco_loss

__all__ = [
    "sce_loss",
    "info_nce_loss",
    "ressl_loss",
    "SCELoss",
    "InfoNCELoss",
    "ReSSLLoss",
    "MemoryQueue",
    "cacr_loss",
    "reco_loss",
    "interpolated_key",
    "nearest_neighbours",
    "CACRLoss",
    "ReCoLoss",
]
__version__ = "0.1.0"  # the one source of the version: pyproject.toml reads it at build time
