"""Image datasets for the pretraining example, as uint8 tensors (N, 3, H, W) plus labels.

Sources: a ``.npz`` in the format of the offline CIFAR-10 copies (raw arrays ``x_train``... or a
JPEG pack ``train_jpeg``/``train_offsets``...), ``cifar10`` through torchvision (downloaded into
``data_dir`` when online), an ImageFolder directory (with ``train``/``test`` or ``train``/``val``
sub-folders, resized to 32×32), or scikit-learn's bundled digits (8×8, upsampled to 16×16), the
default: embedded, no download.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # uint8 (N, 3, H, W)
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def classes(self) -> int:
        return int(self.y_train.max()) + 1


def load(data: str, data_dir: Path) -> Dataset:
    """The dataset named by ``--data``."""
    if data == "cifar10":
        try:
            import torchvision  # noqa: F401
        except ImportError:
            raise ValueError(
                "--data cifar10 downloads CIFAR-10 with torchvision, which is not installed: "
                "pip install 'sce-loss[vision]', or pass a CIFAR-10 .npz file"
            ) from None
        return _cifar10_torchvision(data_dir)
    if data == "digits":
        return _digits()
    path = Path(data)
    if path.suffix == ".npz":
        if not path.is_file():
            raise ValueError(f"--data {data}: file not found")
        return _npz(path)
    if path.is_dir():
        return _image_folder(path)
    raise ValueError(
        "--data must be a .npz file, 'cifar10', 'digits' or an ImageFolder directory; "
        f"{data!r} is none of these"
    )


def _hwc_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    from PIL import Image

    first = np.asarray(
        Image.open(io.BytesIO(blob[offsets[0] : offsets[1]].tobytes())).convert("RGB")
    )
    out = np.empty((len(offsets) - 1, *first.shape), dtype=np.uint8)
    for i in range(len(out)):
        jpeg = io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())
        out[i] = np.asarray(Image.open(jpeg).convert("RGB"))
    return out


def _npz(path: Path) -> Dataset:
    with np.load(path) as archive:
        if "x_train" in archive:
            parts = archive["x_train"], archive["y_train"], archive["x_test"], archive["y_test"]
        elif "train_jpeg" in archive:
            parts = (
                _decode_jpegs(archive["train_jpeg"], archive["train_offsets"]),
                archive["y_train"],
                _decode_jpegs(archive["test_jpeg"], archive["test_offsets"]),
                archive["y_test"],
            )
        else:
            raise ValueError(
                f"--data {path}: expected keys x_train/y_train/x_test/y_test or "
                f"train_jpeg/train_offsets/..., found {sorted(archive.files)}"
            )
    x_train, y_train, x_test, y_test = parts
    return Dataset(
        path.name,
        _hwc_to_tensor(x_train),
        torch.from_numpy(y_train.astype(np.int64)),
        _hwc_to_tensor(x_test),
        torch.from_numpy(y_test.astype(np.int64)),
    )


def _cifar10_torchvision(data_dir: Path) -> Dataset:
    from torchvision.datasets import CIFAR10

    train = CIFAR10(str(data_dir), train=True, download=True)
    test = CIFAR10(str(data_dir), train=False, download=True)
    return Dataset(
        "cifar10",
        _hwc_to_tensor(train.data),
        torch.tensor(train.targets),
        _hwc_to_tensor(test.data),
        torch.tensor(test.targets),
    )


def _image_folder(root: Path) -> Dataset:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor, resize

    splits = [s for s in ("train", "test", "val") if (root / s).is_dir()]
    if "train" not in splits or len(splits) < 2:
        raise ValueError(
            f"--data {root}: an ImageFolder needs train/ and test/ (or val/) sub-folders"
        )
    tensors = []
    for split in ("train", splits[1]):
        folder = ImageFolder(str(root / split))
        images = torch.stack(
            [
                resize(pil_to_tensor(img.convert("RGB")), [32, 32], antialias=True)
                for img, _ in folder
            ]
        )
        tensors += [images, torch.tensor(folder.targets)]
    return Dataset(root.name, *tensors)


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float() / 16.0  # (1797, 8, 8) in [0, 1]
    images = torch.nn.functional.interpolate(
        images[:, None], size=16, mode="bilinear", align_corners=False
    )
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1500], order[1500:]
    return Dataset("digits", images[train], labels[train], images[test], labels[test])
