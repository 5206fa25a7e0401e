"""sce-loss: exact and fast self-supervised contrastive losses (SCE, InfoNCE, ReSSL) for PyTorch."""

from .functional import info_nce_loss, ressl_loss, sce_loss
from .modules import InfoNCELoss, ReSSLLoss, SCELoss
from .queue import MemoryQueue

__all__ = [
    "sce_loss",
    "info_nce_loss",
    "ressl_loss",
    "SCELoss",
    "InfoNCELoss",
    "ReSSLLoss",
    "MemoryQueue",
]
__version__ = "0.1.0"
