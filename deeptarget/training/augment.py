"""Images for fine-tuning: decoded lazily in DataLoader workers, augmented for training (random resized crops,
flips, colour jitter; mixup happens on the batch), and the views of test-time augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from deeptarget.models.decode import decode_image
from deeptarget.models.embedder import centre_crop_tensor


class ImageFiles(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """(uint8 (3, size, size) tensor, label) per file; ``train`` picks a random augmented view each time.

    It holds no model, so DataLoader workers fork cheaply (and never touch CUDA)."""

    def __init__(
        self, items: list[tuple[Path, int]], image_size: int, train: bool, max_pixels: int, long_side: int
    ) -> None:
        self.items = items
        self.image_size = size = image_size
        self.max_pixels = max_pixels
        self.long_side = long_side
        self.augment = (
            v2.Compose(
                [
                    v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
                    v2.RandomHorizontalFlip(),
                    v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03),
                ]
            )
            if train
            else None
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        image = decode_image(Path(path).read_bytes(), max_pixels=self.max_pixels, long_side=self.long_side)
        tensor = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)  # decoders may return read-only arrays
        if self.augment is None:
            return centre_crop_tensor(tensor, self.image_size), label  # exactly what the workers see
        return self.augment(tensor), label


def mixup(
    images: torch.Tensor, labels: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(mixed float images, labels, partner labels, weight of ``labels``); alpha 0 leaves the batch alone."""
    if alpha <= 0:
        return images, labels, labels, 1.0
    weight = float(torch.distributions.Beta(alpha, alpha).sample())
    order = torch.randperm(len(images), generator=generator).to(images.device)
    mixed = weight * images + (1 - weight) * images[order]
    return mixed, labels, labels[order], weight


def tta_views(batch: torch.Tensor) -> list[torch.Tensor]:
    """Test-time views of a centre-cropped uint8 batch: as is and mirrored. On the food set (fine-tuned MobileNetV2)
    adding 87.5% centre zooms, mirrored or not, scored 0.820 against 0.828 for these two: within noise, at twice
    the cost."""
    return [batch, batch.flip(-1)]
