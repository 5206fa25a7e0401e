"""Image datasets for the pretraining example, as uint8 tensors (N, 3, H, W) plus labels.

Sources: a ``.npz`` in the format of the offline CIFAR-10 copies (raw arrays ``x_train``... or a
JPEG pack ``train_jpeg``/``train_offsets``...), ``cifar10`` (the JPEG pack ``cifar10-jpeg.npz`` in
``data_dir`` if it is there, else torchvision's copy, downloaded into ``data_dir`` when online), an
ImageFolder directory (with ``train``/``test`` or ``train``/``val`` sub-folders, resized to 32×32),
or scikit-learn's bundled digits (8×8, upsampled to 16×16), the default: embedded, no download.
``per_class`` keeps the first K training images of each class, in the dataset's own order.
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


CIFAR10_PACK = "cifar10-jpeg.npz"


def load(data: str, data_dir: Path, per_class: int | None = None) -> Dataset:
    """The dataset named by ``--data``; with ``per_class``, the first that many training images
    of each class (the test split whole)."""
    if data == "cifar10":
        if (Path(data_dir) / CIFAR10_PACK).is_file():
            return _npz(Path(data_dir) / CIFAR10_PACK, per_class, name="cifar10")
        _need_torchvision(
            f"--data: cifar10: no {CIFAR10_PACK} in --data-dir {data_dir}, and torchvision, "
            "which downloads CIFAR-10",
            "or pass --data-dir the folder that holds the pack",
        )
        return _subset(_cifar10_torchvision(data_dir), per_class)
    if data == "digits":
        return _subset(_digits(), per_class)
    path = Path(data)
    if path.suffix == ".npz":
        if not path.is_file():
            raise ValueError(f"--data: {data}: file not found")
        return _npz(path, per_class)
    if path.is_dir():
        return _subset(_image_folder(path), per_class)
    raise ValueError(
        "--data must be a .npz file, 'cifar10', 'digits' or an ImageFolder directory; "
        f"{data!r} is none of these"
    )


def _need_torchvision(what: str, otherwise: str = "") -> None:
    """Refuse, naming ``what`` needs it, when torchvision is missing or does not load with this
    torch (a CUDA build beside a CPU torch raises at import)."""
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError) as error:
        problem = (
            "is not installed" if isinstance(error, ImportError) else f"does not load ({error})"
        )
        raise ValueError(
            f"{what}, {problem}: install the vision extra with your torch pinned (the README's "
            "Set-up gives the line, with --extra-index-url for a CPU torch)"
            + (f", {otherwise}" if otherwise else "")
        ) from None


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The indices of the first ``per_class`` images of each class, in ascending order."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    if counts.min() < per_class:
        raise ValueError(
            f"--per-class: {per_class} is more than the {counts.min()} training images of class "
            f"{counts.argmin()}"
        )
    return np.sort(
        np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(counts))])
    )


def _subset(dataset: Dataset, per_class: int | None) -> Dataset:
    if per_class is not None:
        keep = torch.from_numpy(first_per_class(dataset.y_train.numpy(), per_class))
        dataset.x_train, dataset.y_train = dataset.x_train[keep], dataset.y_train[keep]
    return dataset


def _hwc_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The images ``index`` of a JPEG pack, decoded with Pillow, (len(index), H, W, 3)."""
    from PIL import Image

    def decode(i):
        jpeg = io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())
        return np.asarray(Image.open(jpeg).convert("RGB"))

    first = decode(index[0])
    out = np.empty((len(index), *first.shape), dtype=np.uint8)
    for row, i in enumerate(index):
        out[row] = decode(i)
    return out


def _npz(path: Path, per_class: int | None = None, name: str | None = None) -> Dataset:
    try:
        opened = np.load(path)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"--data: {path} is not a readable .npz ({error})") from None
    if not isinstance(opened, np.lib.npyio.NpzFile):
        raise ValueError(f"--data: {path} holds one array, not a .npz archive of named arrays")
    with opened as archive:
        if "x_train" in archive:
            y_train = archive["y_train"]
            keep = first_per_class(y_train, per_class) if per_class else slice(None)
            parts = archive["x_train"][keep], y_train[keep], archive["x_test"], archive["y_test"]
        elif "train_jpeg" in archive:
            y_train, y_test = archive["y_train"], archive["y_test"]
            keep = first_per_class(y_train, per_class) if per_class else np.arange(len(y_train))
            parts = (
                _decode_jpegs(archive["train_jpeg"], archive["train_offsets"], keep),
                y_train[keep],
                _decode_jpegs(
                    archive["test_jpeg"], archive["test_offsets"], np.arange(len(y_test))
                ),
                y_test,
            )
        else:
            raise ValueError(
                f"--data: {path}: expected keys x_train/y_train/x_test/y_test or "
                f"train_jpeg/train_offsets/..., found {sorted(archive.files)}"
            )
    x_train, y_train, x_test, y_test = parts
    return Dataset(
        name or path.name,
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
    _need_torchvision(f"--data: {root} is an ImageFolder directory, which reads with torchvision")
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor, resize

    splits = [s for s in ("train", "test", "val") if (root / s).is_dir()]
    if "train" not in splits or len(splits) < 2:
        raise ValueError(
            f"--data: {root}: an ImageFolder needs train/ and test/ (or val/) sub-folders"
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
