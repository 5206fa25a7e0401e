"""Batched image augmentation on the device, with independent random parameters per image.

strong (SCE/ReSSL online view): random resized crop (area 0.2–1, ratio 3/4–4/3), horizontal flip,
colour jitter (brightness, contrast, saturation 0.4, hue 0.1) with p=0.8, greyscale with p=0.2.
weak (target view): random resized crop and flip only.
cutmix (ReCo's mixed view): a box of each image replaced by the same box of a partner image.

Crops are one ``affine_grid`` + ``grid_sample`` per batch; jitter is applied in a fixed order
(brightness, contrast, saturation, hue) and hue is rotated in YIQ space, a close and cheap stand-in
for torchvision's HSV shift.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _uniform(n, low, high, device, generator):
    return torch.rand(n, device=device, generator=generator) * (high - low) + low


def random_resized_crop_and_flip(
    x: torch.Tensor, generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)
):
    """x (B, C, H, W) float → crops of random area fraction and aspect ratio, resized back, and
    flipped with p=0.5; crops that would overflow the image are shrunk to fit."""
    b, device = x.shape[0], x.device
    area = _uniform(b, *scale, device, generator)
    log_ratio = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), device, generator)
    width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)  # fractions of the image side
    height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    centre_x = (torch.rand(b, device=device, generator=generator) * 2 - 1) * (1 - width)
    centre_y = (torch.rand(b, device=device, generator=generator) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(b, device=device, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _grey(x):
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def colour_jitter(x, generator, strength=(0.4, 0.4, 0.4, 0.1), p=0.8):
    b, device = x.shape[0], x.device
    apply = (torch.rand(b, device=device, generator=generator) < p).view(b, 1, 1, 1)
    brightness, contrast, saturation, hue = strength
    factor = lambda s: _uniform(b, 1 - s, 1 + s, device, generator).view(b, 1, 1, 1)  # noqa: E731
    out = (x * factor(brightness)).clamp(0, 1)
    mean = _grey(out).mean(dim=(2, 3), keepdim=True)
    out = ((out - mean) * factor(contrast) + mean).clamp(0, 1)
    grey = _grey(out)
    out = ((out - grey) * factor(saturation) + grey).clamp(0, 1)
    angle = _uniform(b, -hue, hue, device, generator) * 2 * math.pi
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=device
    )
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, out)
    cos, sin = torch.cos(angle).view(b, 1, 1), torch.sin(angle).view(b, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], 1)
    out = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq).clamp(0, 1)
    return torch.where(apply, out, x)


def random_greyscale(x, generator, p=0.2):
    apply = (torch.rand(x.shape[0], device=x.device, generator=generator) < p).view(-1, 1, 1, 1)
    return torch.where(apply, _grey(x).expand_as(x), x)


def normalise(x):
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def to_float(images_uint8):
    return images_uint8.float() / 255.0


def weak(images_uint8, generator):
    return normalise(random_resized_crop_and_flip(to_float(images_uint8), generator))


def strong(images_uint8, generator):
    x = random_resized_crop_and_flip(to_float(images_uint8), generator)
    return normalise(random_greyscale(colour_jitter(x, generator), generator))


def plain(images_uint8):
    return normalise(to_float(images_uint8))


def cutmix(images, partners, generator):
    """CutMix as in ReCo's official code: r ~ Beta(1, 1) (uniform), one box of sides
    ⌊side·√(1 − r)⌋ centred uniformly and clipped to the image, copied from ``partners`` into every
    image of the batch. Returns the mixed batch and the share of each image that was kept,
    1 − box area / image area."""
    height, width = images.shape[-2:]
    draws = torch.rand(3, device=images.device, generator=generator).tolist()
    cut = math.sqrt(1 - draws[0])
    cut_h, cut_w = int(height * cut), int(width * cut)
    centre_y, centre_x = int(draws[1] * height), int(draws[2] * width)
    top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y + cut_h // 2, height)
    left, right = max(centre_x - cut_w // 2, 0), min(centre_x + cut_w // 2, width)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = partners[..., top:bottom, left:right]
    return mixed, 1 - (bottom - top) * (right - left) / (height * width)
