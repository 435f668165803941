"""Image embeddings from a torchvision backbone: L2-normalised float32 vectors, batched, on CUDA when present.

Weights never come from the network at run time. They are one of:
- ``imagenet``: torchvision's pretrained file, which must already be in torchvision's cache and pass its check against
  the digest in ``models/files.py`` (``deeptarget models fetch`` puts it there; the error says so);
- a path to a ``.pth`` state dict for the stock torchvision architecture;
- ``none``: random weights from a fixed seed, so every process (workers, API) computes the same embeddings;
- ``auto``: ``imagenet`` when cached and verified, else ``none`` with a warning naming the fetch
  (``models.files.weights_choice``, which ``deeptarget models list`` reports too).

``model_id`` names backbone and weights; the index refuses to mix embeddings from different model ids.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torchvision

from deeptarget.core.errors import ConfigurationError
from deeptarget.core.settings import Settings
from deeptarget.models.decode import resize_uint8
from deeptarget.models.files import MODEL_FILES, ModelFile, cache_path, weights_choice

LOG = logging.getLogger(__name__)

RANDOM_WEIGHTS_SEED = 0

_NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # RGB scaled to [-1, 1]
}


@dataclass(frozen=True)
class Backbone:
    name: str
    dim: int
    weights_enum: Any  # torchvision WeightsEnum member

    def build(self) -> torch.nn.Module:
        model: torch.nn.Module = getattr(torchvision.models, self.name)(weights=None)
        return model

    @staticmethod
    def strip_classifier(model: torch.nn.Module) -> torch.nn.Module:
        """Replace the ImageNet classifier with identity: the forward pass then ends at the pooled features."""
        if hasattr(model, "fc"):
            model.fc = torch.nn.Identity()
        else:
            model.classifier = torch.nn.Identity()
        return model


BACKBONES: dict[str, Backbone] = {
    "mobilenet_v2": Backbone("mobilenet_v2", 1280, torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1),
    "resnet50": Backbone("resnet50", 2048, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
    "efficientnet_b0": Backbone("efficientnet_b0", 1280, torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1),
}


def torchvision_cache_file(backbone: Backbone) -> Path:
    """Where torchvision looks for the backbone's pretrained weights (TORCH_HOME/hub/checkpoints/<file>)."""
    return cache_path(MODEL_FILES[backbone.name])


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("device = 'cuda' but torch sees no CUDA device")
    return torch.device(device)


def centre_crop_tensor(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a (3, H, W) uint8 tensor so its short side is ``size``, then crop the centre square."""
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    resized = resize_uint8(image, (new_h, new_w))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[:, top : top + size, left : left + size]


@dataclass(frozen=True)
class EmbedderSpec:
    """What builds an embedder again in another process: ``weights`` resolved ('none', 'imagenet' or a file's
    absolute path). Workers record it under the model id, so that the API can embed query images with the model of
    the index it serves while a switch of weights is under way."""

    backbone: str
    weights: str
    normalization: str
    image_size: int


class Embedder:
    """``Embedder(...)(images) -> (n, dim) float32``, rows L2-normalised. Images are RGB uint8 arrays of any size."""

    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        weights: str = "auto",
        normalization: str = "imagenet",
        image_size: int = 224,
        device: str = "auto",
        micro_batch: int = 0,
        files: Mapping[str, ModelFile] = MODEL_FILES,
    ) -> None:
        """``files``: the registry of pretrained files and their digests (``models/files.py``)."""
        if backbone not in BACKBONES:
            raise ConfigurationError(f"unknown backbone {backbone!r}: choose one of {sorted(BACKBONES)}")
        if normalization not in _NORMALIZATION:
            raise ConfigurationError(f"unknown normalization {normalization!r}: 'imagenet' or 'inception'")
        self.backbone = BACKBONES[backbone]
        self.image_size = image_size
        self.device = resolve_device(device)
        # mobilenet_v2 on 2 cores: 38-55 images/s at 16 against 34-39 at 32 and 64 (bench/infer.py)
        self.micro_batch = micro_batch or (128 if self.device.type == "cuda" else 16)
        mean, std = _NORMALIZATION[normalization]
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255.0

        self._files = files
        model, weights_tag, resolved = self._load(weights)
        self.model_id = f"{backbone}:{weights_tag}:{normalization}:{image_size}"
        self.spec = EmbedderSpec(backbone, resolved, normalization, image_size)
        model = Backbone.strip_classifier(model).eval().to(self.device)
        self.model = model.to(memory_format=torch.channels_last)
        self.dim = self.backbone.dim

    @classmethod
    def from_settings(cls, settings: Settings) -> Embedder:
        """The embedder the settings describe (workers, queries and training must agree on it)."""
        s = settings
        _fetch_weights(s.weights)
        return cls(s.backbone, s.weights, s.weights_normalization, s.image_size, s.device, s.micro_batch)

    @classmethod
    def from_spec(cls, spec: EmbedderSpec, settings: Settings) -> Embedder:
        """The embedder a spec describes, on the settings' device."""
        _fetch_weights(spec.weights)
        return cls(spec.backbone, spec.weights, spec.normalization, spec.image_size, settings.device,
                   settings.micro_batch)  # fmt: skip

    @property
    def dtype(self) -> torch.dtype | None:
        """Autocast dtype on CUDA (bf16 where supported); None on CPU, where float32 is fastest."""
        if self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _load(self, weights: str) -> tuple[torch.nn.Module, str, str]:
        """The model, its weights' tag in the model id, and the weights resolved (see ``EmbedderSpec``)."""
        choice = weights_choice(self.backbone.name, weights, self._files)
        if choice.error:
            raise ConfigurationError(choice.error)
        if choice.warning:
            LOG.warning("%s", choice.warning)
        weights = choice.weights
        if weights == "none":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_WEIGHTS_SEED)
                return self.backbone.build(), f"random{RANDOM_WEIGHTS_SEED}", "none"
        if weights == "imagenet":
            assert choice.path is not None  # a verified file (weights_choice)
            return self._from_file(choice.path), "imagenet", "imagenet"
        path = Path(weights)
        if not path.is_file():
            raise ConfigurationError(
                f"weights file {path} not found: give a .pth state dict for torchvision's {self.backbone.name}, "
                "'imagenet' (torchvision cache) or 'none'"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        return self._from_file(path), f"file-{digest}", str(path.resolve())

    def _from_file(self, path: Path) -> torch.nn.Module:
        model = self.backbone.build()
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigurationError(
                f"{path} does not fit torchvision's {self.backbone.name}: "
                f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
            )
        return model

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """Resize the short side to ``image_size`` and centre-crop a square: HWC uint8."""
        height, width = image.shape[:2]
        scale = self.image_size / min(height, width)
        new_w, new_h = max(self.image_size, round(width * scale)), max(self.image_size, round(height * scale))
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
        top, left = (new_h - self.image_size) // 2, (new_w - self.image_size) // 2
        return resized[top : top + self.image_size, left : left + self.image_size]

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        batch = np.stack([self.preprocess(im) for im in images])
        return self.embed_preprocessed(batch)

    def preprocess_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """``preprocess`` for a (3, H, W) uint8 tensor on any device (antialiased bilinear): (3, size, size) uint8."""
        return centre_crop_tensor(image, self.image_size)

    def embed_preprocessed(self, batch: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) uint8 -> (n, dim) float32, L2-normalised, in micro-batches."""
        return self.embed_tensors(torch.from_numpy(batch).permute(0, 3, 1, 2))

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """(n, 3, h, w) uint8 on this device -> the float input the backbone was trained on (channels-last)."""
        return ((batch.float() - self._mean) / self._std).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def embed_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """(n, 3, size, size) uint8 on any device -> (n, dim) float32, L2-normalised, in micro-batches."""
        out = []
        for start in range(0, len(batch), self.micro_batch):
            chunk = batch[start : start + self.micro_batch]
            if chunk.device != self.device:
                if self.device.type == "cuda":
                    chunk = chunk.contiguous().pin_memory()
                chunk = chunk.to(self.device, non_blocking=True)
            x = self.normalize(chunk)
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                features = self.model(x)
            out.append(torch.nn.functional.normalize(features.float(), dim=1).cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


def _fetch_weights(weights: str | None) -> None:
    """A weights file (a fine-tuned backbone) that lies in an attached data dir but not here comes from the bucket."""
    if weights and Path(weights).suffix in (".pth", ".pt"):
        from deeptarget.store.remote import fetch_missing

        fetch_missing(Path(weights))
