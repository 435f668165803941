"""Why a head sees a class in an image, and which regions make an image similar to another: heat maps from captum.

``Explainer(embedder, head)`` explains with one of ``METHODS``, both captum's:

- ``gradcam``: ``LayerGradCam`` on the backbone's last convolutional block (``target_layer``: 7 x 7 at 224 px),
  positive part, upsampled bilinearly to the input (``LayerAttribution.interpolate``). One forward and one backward
  pass an image.
- ``occlusion``: ``Occlusion`` with a square window of a quarter of the input slid by an eighth (7 x 7 positions at
  224 px), the window filled with the normalisation's mean (0 in the model's input): how much the score falls when
  each region is hidden. 49 forward passes an image.

``bench/explain.py`` measures both with the deletion check on real photos; ``DEFAULT_METHOD`` is the one that
passed it, and the comment there gives the numbers. What is explained is a score of the model's input: a class's
logit under the head (on the L2-normalised embedding, as the head sees it), or for similarity the cosine between the
image's embedding and another's (``explain_similarity``: a scalar per input, as captum takes it).

Heat maps are at the model's input size (the centre crop ``Embedder.preprocess`` makes), in [0, 1] (divided by
their maximum; all zeros when nothing speaks for the target). The explainer runs on its own copy of the backbone:
captum hooks the layer it explains, and the embedder's model may be embedding for other threads at the same time.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam, Occlusion

from deeptarget.core.errors import ConfigurationError, NotFoundError
from deeptarget.models.embedder import Embedder
from deeptarget.models.heads import LinearHead
from deeptarget.models.overlay import overlay_png

METHODS = ("gradcam", "occlusion")
# The deletion check (bench/explain.py: the 500 held-out Food-101 photos, shared MobileNetV2 weights, 20% of the
# pixels filled with the image's mean colour): occlusion's heat maps lower the predicted class's probability by 0.141
# against 0.115 for as many random pixels (1.22x [1.14, 1.31], sign test p = 0.001; with a blur fill 1.60x on 100);
# Grad-CAM's by 0.087, less than random pixels (0.75x; blur: 1.03x, a tie), though both beat random blobs of
# Grad-CAM's own 7 x 7 shape (2.28x, 1.41x). Occlusion costs 49 passes to Grad-CAM's one (about 1 s an image on 2
# CPU cores against 0.03 s): method="gradcam" where that matters.
DEFAULT_METHOD = "occlusion"
TOP_CLASSES = 5
MICRO_BATCH = 16
OCCLUSION_PER_EVAL = 4  # occluded copies of each image per forward pass: 64 images at a time


def target_layer(backbone: str, model: torch.nn.Module) -> torch.nn.Module:
    """The last convolutional block of a torchvision backbone: the one Grad-CAM explains. ResNets end in
    ``layer4`` (its last bottleneck); MobileNetV2 and EfficientNet in ``features`` (a 1x1 conv to 1280 channels)."""
    if backbone.startswith("resnet"):
        return list(model.get_submodule("layer4").children())[-1]  # a Sequential of bottlenecks
    if backbone.startswith(("mobilenet", "efficientnet")):
        return list(model.get_submodule("features").children())[-1]  # a Sequential of blocks
    raise ConfigurationError(f"no explanation layer is known for backbone {backbone!r}")


class _HeadLogits(torch.nn.Module):
    """Normalised input -> the head's logits on the L2-normalised embedding: (n, classes)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, backbone: torch.nn.Module, head: LinearHead, device: torch.device) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("weight", torch.from_numpy(np.ascontiguousarray(head.weight, np.float32)).to(device))
        self.register_buffer("bias", torch.from_numpy(np.ascontiguousarray(head.bias, np.float32)).to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.nn.functional.normalize(self.backbone(x).float(), dim=1)
        logits: torch.Tensor = features @ self.weight.T + self.bias
        return logits


class _Cosine(torch.nn.Module):
    """Normalised input -> the cosine of its embedding with ``other`` (set before each call): (n, 1)."""

    other: torch.Tensor

    def __init__(self, backbone: torch.nn.Module, dim: int, device: torch.device) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("other", torch.zeros(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.nn.functional.normalize(self.backbone(x).float(), dim=1)
        return (features @ self.other)[:, None]


@dataclass(frozen=True)
class Explanation:
    """One explained image. ``image`` is what the model saw, at the decoded resolution (the centre square);
    ``heatmap`` is at the model's input size, in [0, 1]; ``score`` the explained class's probability, or the cosine
    similarity; ``classes`` the head's top classes, most probable first (empty without a head)."""

    image: np.ndarray
    heatmap: np.ndarray
    explained: str  # class:<name> or similar:<post id>
    score: float
    classes: list[tuple[str, float]]
    method: str

    def png(self) -> bytes:
        """The image with the heat map over it, as a PNG file's bytes."""
        return overlay_png(self.image, self.heatmap)


def top_classes(probabilities: np.ndarray, classes: Sequence[str], k: int = TOP_CLASSES) -> list[tuple[str, float]]:
    """The ``k`` most probable (class, probability) of one row, most probable first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(classes[i], float(probabilities[i])) for i in order]


def centre_square(image: np.ndarray) -> np.ndarray:
    """The centre square of an (h, w, 3) image: the part ``Embedder.preprocess`` keeps, at this resolution."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top : top + side, left : left + side]


def _unit_maps(maps: torch.Tensor) -> np.ndarray:
    """(n, h, w) attributions -> their positive part divided by each map's maximum (zeros stay zeros)."""
    positive = maps.detach().float().clamp(min=0)
    peak = positive.flatten(1).amax(dim=1).clamp(min=1e-12)[:, None, None]
    result: np.ndarray = (positive / peak).cpu().numpy().astype(np.float32)
    return result


class Explainer:
    """Heat maps for a head's classes (``head`` given) and for the similarity of two embeddings, with one of
    ``METHODS``. Safe to share between threads (one explanation at a time)."""

    def __init__(self, embedder: Embedder, head: LinearHead | None = None, method: str = DEFAULT_METHOD) -> None:
        if method not in METHODS:
            raise ConfigurationError(f"unknown explanation method {method!r}: choose one of {', '.join(METHODS)}")
        if head is not None and head.model_id != embedder.model_id:
            raise ConfigurationError(
                f"head {head.name} v{head.version} was trained on {head.model_id}, not on {embedder.model_id}"
            )
        self.embedder = embedder
        self.head = head
        self.method = method
        self.size = embedder.image_size
        backbone = copy.deepcopy(embedder.model).float().eval()
        for parameter in backbone.parameters():
            parameter.requires_grad_(False)  # gradients flow to the input and the layer, never into the weights
        self._layer = target_layer(embedder.backbone.name, backbone)
        self._logits = _HeadLogits(backbone, head, embedder.device) if head is not None else None
        self._cosine = _Cosine(backbone, embedder.dim, embedder.device)
        self._lock = threading.Lock()

    # -- single images --------------------------------------------------------------------------------------------
    def class_index(self, name: str) -> int:
        head = self._need_head()
        if name not in head.classes:
            known = ", ".join(head.classes[:20]) + (" ..." if len(head.classes) > 20 else "")
            raise NotFoundError(f"head {head.name} has no class {name!r} (it has {known})")
        return head.classes.index(name)

    def explain(self, image: np.ndarray, class_name: str | None = None, top: int = TOP_CLASSES) -> Explanation:
        """Which regions of ``image`` (RGB uint8, any size) drive the head's class ``class_name`` (default: the most
        probable one)."""
        head = self._need_head()
        batch = self.batch([image])
        probabilities = self.probabilities(batch)[0]
        index = self.class_index(class_name) if class_name is not None else int(np.argmax(probabilities))
        heatmap = self.heatmaps(batch, [index])[0]
        return Explanation(
            centre_square(image), heatmap, f"class:{head.classes[index]}", float(probabilities[index]),
            top_classes(probabilities, head.classes, top), self.method,
        )  # fmt: skip

    def explain_similarity(
        self, image: np.ndarray, other: np.ndarray, label: str = "other", top: int = TOP_CLASSES
    ) -> Explanation:
        """Which regions of ``image`` make its embedding similar to ``other`` (an embedding of this model); the
        head's top classes too when there is a head."""
        batch = self.batch([image])
        heatmap = self.similarity_heatmaps(batch, other)[0]
        cosine = float(self.embedder.embed_tensors(batch)[0] @ np.asarray(other, np.float32))
        classes = top_classes(self.probabilities(batch)[0], self.head.classes, top) if self.head is not None else []
        return Explanation(centre_square(image), heatmap, f"similar:{label}", cosine, classes, self.method)

    # -- batches of preprocessed images (the deletion check, the training report) -----------------------------------
    def batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 images of any size -> (n, 3, size, size) uint8: the embedder's own preprocessing."""
        return torch.from_numpy(np.stack([self.embedder.preprocess(im) for im in images])).permute(0, 3, 1, 2)

    def probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """(n, 3, size, size) uint8 -> (n, classes): what the head says, through the embedder's own path."""
        return self._need_head()(self.embedder.embed_tensors(batch))

    def heatmaps(self, batch: torch.Tensor, targets: Sequence[int]) -> np.ndarray:
        """(n, 3, size, size) uint8 and a class index per image -> (n, size, size) heat maps in [0, 1]."""
        logits = self._logits
        if logits is None:
            raise ConfigurationError("explaining a class needs a head")
        return self._attribute(logits, batch, list(targets))

    def similarity_heatmaps(self, batch: torch.Tensor, other: np.ndarray) -> np.ndarray:
        """(n, 3, size, size) uint8 -> (n, size, size): which regions make each image similar to ``other``."""
        vector = torch.from_numpy(np.ascontiguousarray(other, np.float32)).reshape(-1)
        if vector.numel() != self.embedder.dim:
            raise ConfigurationError(f"an embedding of {vector.numel()} values, not {self.embedder.dim}")
        with self._lock:
            self._cosine.other.copy_(torch.nn.functional.normalize(vector, dim=0))
            return self._attribute(self._cosine, batch, [0] * len(batch), locked=True)

    def _attribute(
        self, forward: torch.nn.Module, batch: torch.Tensor, targets: list[int], locked: bool = False
    ) -> np.ndarray:
        if not locked:
            with self._lock:
                return self._attribute(forward, batch, targets, locked=True)
        out = []
        for start in range(0, len(batch), MICRO_BATCH):
            chunk = batch[start : start + MICRO_BATCH].to(self.embedder.device)
            x = self.embedder.normalize(chunk)
            target = torch.tensor(targets[start : start + MICRO_BATCH], device=self.embedder.device)
            if self.method == "gradcam":
                cam = LayerGradCam(forward, self._layer).attribute(x, target=target, relu_attributions=True)
                maps = LayerAttribution.interpolate(cam, (self.size, self.size), interpolate_mode="bilinear")[:, 0]
            else:
                window, stride = max(1, self.size // 4), max(1, self.size // 8)
                with torch.no_grad():
                    attributions = Occlusion(forward).attribute(
                        x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride), baselines=0.0,
                        target=target, perturbations_per_eval=OCCLUSION_PER_EVAL,
                    )  # fmt: skip
                maps = attributions.sum(dim=1)
            out.append(_unit_maps(maps))
        return np.concatenate(out) if out else np.zeros((0, self.size, self.size), np.float32)

    def _need_head(self) -> LinearHead:
        if self.head is None:
            raise ConfigurationError("explaining a class needs a head")
        return self.head
