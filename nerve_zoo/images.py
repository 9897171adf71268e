"""Image classification data for the MLP-Mixer runs.

``load_image_dataset(name)`` returns train/validation splits as ``ImageTensorDataset`` objects whose
items are ``{"pixel_values": [C, H, W] float, "labels": int}`` (``default_data_collator`` stacks them).

- ``digits`` (offline default): scikit-learn's bundled UCI handwritten digits, 1797 real 8x8 grayscale
  images in 10 classes; deterministic seeded split (``val_fraction`` held out).
- ``cifar100``: CIFAR-100 (50 000 train / 10 000 test, 32x32 RGB, 100 fine labels), read from a local
  ``cifar-100-python`` directory (the pickle release) when ``data_dir`` holds one, otherwise
  ``datasets.load_dataset("uoft-cs/cifar100")`` from the Hub (columns ``img``, ``fine_label``); the
  official test split is the validation split.

Images are stored once as uint8 ``[N, C, H, W]`` at their native size; resizing to ``image_size``
(bilinear), channel replication (grayscale -> RGB) and per-channel standardisation with the training
split's mean/std happen per item, so a 224-pixel Mixer-B/16 run does not hold 30 GB of floats.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


@dataclass(frozen=True)
class RawImages:
    train_images: torch.Tensor  # uint8 [N_train, C, H, W]
    train_labels: torch.Tensor  # int64 [N_train]
    val_images: torch.Tensor  # uint8 [N_val, C, H, W]
    val_labels: torch.Tensor  # int64 [N_val]
    num_classes: int
    source: str  # where the data came from (provenance for result files)


class ImageTensorDataset(Dataset):
    """uint8 images resized, channel-replicated and standardised on access."""

    def __init__(
        self,
        images: torch.Tensor,  # uint8 [N, C0, H0, W0]
        labels: torch.Tensor,  # int64 [N]
        image_size: int,
        channels: int,
        mean: torch.Tensor,  # [channels] in [0, 1] units
        std: torch.Tensor,  # [channels]
    ):
        if images.shape[1] not in (1, channels):
            raise ValueError(f"cannot turn {images.shape[1]} channels into {channels}")
        self.images, self.labels = images, labels
        self.image_size, self.channels = image_size, channels
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorised fetch: ``(pixel_values [B, C, S, S], labels [B])``."""
        x = self.images[indices].float() / 255.0  # [B, C0, H0, W0]
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = x.expand(-1, self.channels, -1, -1)  # grayscale -> replicated channels
        return (x - self.mean) / self.std, self.labels[indices]

    def __getitem__(self, index: int) -> dict:
        x, y = self.batch(torch.tensor([index]))
        return {"pixel_values": x[0], "labels": int(y[0])}


@dataclass(frozen=True)
class ImageSplits:
    train: ImageTensorDataset
    val: ImageTensorDataset
    num_classes: int
    image_size: int
    channels: int
    source: str


def _load_digits(data_dir: str | None, val_fraction: float, seed: int) -> RawImages:
    from nerve_hf.data import DIGITS_SOURCE, load_digits  # bundled with scikit-learn: no download

    images01, targets = load_digits()  # [1797, 8, 8] in [0, 1], [1797]
    images = torch.from_numpy(np.rint(images01 * 255.0).astype(np.uint8))[:, None]  # [1797, 1, 8, 8]
    labels = torch.from_numpy(targets)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * len(labels)))
    val, train = order[:n_val], order[n_val:]
    return RawImages(images[train], labels[train], images[val], labels[val], 10, DIGITS_SOURCE)


def _read_cifar_pickle(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    images = torch.from_numpy(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
    return images, torch.tensor(batch[b"fine_labels"], dtype=torch.int64)


def _find_cifar100_dir(data_dir: str | None) -> Path | None:
    if data_dir is None:
        return None
    for candidate in (Path(data_dir), Path(data_dir) / "cifar-100-python"):
        if (candidate / "train").is_file() and (candidate / "test").is_file():
            return candidate
    return None


def _load_cifar100(data_dir: str | None, val_fraction: float, seed: int) -> RawImages:
    local = _find_cifar100_dir(data_dir)
    if local is not None:
        train_images, train_labels = _read_cifar_pickle(local / "train")
        val_images, val_labels = _read_cifar_pickle(local / "test")
        return RawImages(train_images, train_labels, val_images, val_labels, 100, str(local))
    from datasets import load_dataset  # needs a network (Hub)

    hub = load_dataset("uoft-cs/cifar100")

    def to_tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.stack([np.asarray(img.convert("RGB"), dtype=np.uint8) for img in split["img"]])  # [N, H, W, 3]
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(split["fine_label"])

    train_images, train_labels = to_tensors(hub["train"])
    val_images, val_labels = to_tensors(hub["test"])
    return RawImages(train_images, train_labels, val_images, val_labels, 100, "hf://uoft-cs/cifar100")


# dataset name -> loader(data_dir, val_fraction, seed)
IMAGE_DATASETS: dict[str, Callable[[str | None, float, int], RawImages]] = {
    "digits": _load_digits,
    "cifar100": _load_cifar100,
}


def load_image_dataset(
    name: str = "digits",
    image_size: int = 16,
    channels: int = 3,
    val_fraction: float = 0.2,
    seed: int = 0,
    data_dir: str | None = None,
) -> ImageSplits:
    """Load an image classification set as standardised train/val splits (see module docstring)."""
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; choose one of {sorted(IMAGE_DATASETS)}")
    raw = IMAGE_DATASETS[name](data_dir, val_fraction, seed)
    train = raw.train_images.float() / 255.0  # [N, C0, H, W]
    mean = train.mean(dim=(0, 2, 3)).expand(channels).clone()  # [channels]
    std = train.std(dim=(0, 2, 3)).clamp_min(1e-6).expand(channels).clone()
    splits = [
        ImageTensorDataset(images, labels, image_size, channels, mean, std)
        for images, labels in ((raw.train_images, raw.train_labels), (raw.val_images, raw.val_labels))
    ]
    return ImageSplits(splits[0], splits[1], raw.num_classes, image_size, channels, raw.source)
