"""The model files deeptarget knows: where each comes from, where it goes, and how it is checked.

Nothing here touches the network (``models/fetch.py`` does, and only for ``deeptarget models fetch``). Every file is
checked against a SHA-256 the project records before it is used. Two strengths of check, said as such wherever a
check is reported:

- ``verified (sha256)``: the whole SHA-256 is recorded here, with its source;
- ``prefix-verified (sha256 b0353104…, torchvision's own check)``: torchvision names each weights file by the first
  8 hex digits of its SHA-256 and ``torch.hub.download_url_to_file(..., hash_prefix=...)`` checks exactly that prefix
  (``load_state_dict_from_url(check_hash=True)``). Where no full digest could be found from a source to cite, that is
  the check recorded.

Where files go: torchvision's weights into torchvision's own cache (``torch.hub.get_dir()/checkpoints/<file>``, i.e.
``$TORCH_HOME/hub/checkpoints``), where torchvision itself would put them; deeptarget's own files (YuNet) into
``settings.model_files_dir`` (``DEEPTARGET_MODEL_CACHE_DIR``, default ``<data_dir>/models/files``).

``auto`` (weights and face detector) is decided here once, for the embedder, the pipeline and ``models list``:
``weights_choice`` and ``face_model_file``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deeptarget.core.settings import Settings

LOG = logging.getLogger(__name__)

MiB = 1024 * 1024
FETCH_HINT = "deeptarget models fetch"


@dataclass(frozen=True)
class ModelFile:
    """One file: its upstream ``url`` (``--mirror`` serves the same ``file_name``), its cache (``torchvision``: the
    torch hub cache; ``deeptarget``: ``settings.model_files_dir``), its SHA-256 (64 hex digits, or the prefix that
    is all that is known) and the bounds on its size in bytes (``min_size == max_size`` when it is known exactly)."""

    name: str
    url: str
    file_name: str
    cache: Literal["torchvision", "deeptarget"]
    sha256: str
    min_size: int
    max_size: int
    digest_source: str
    hosts: tuple[str, ...] = ()  # hosts a download from url may be redirected to (url's own host is always allowed)
    description: str = ""

    def __post_init__(self) -> None:
        digest = self.sha256
        if digest != digest.lower() or not 8 <= len(digest) <= 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{self.name}: sha256 must be 8 to 64 lowercase hex digits")
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(f"{self.name}: sizes must be 0 < min_size <= max_size")
        if "/" in self.file_name or self.file_name.startswith("."):
            raise ValueError(f"{self.name}: file_name must be a plain file name")

    @property
    def full_digest(self) -> bool:
        return len(self.sha256) == 64

    @property
    def exact_size(self) -> int | None:
        return self.min_size if self.min_size == self.max_size else None

    @property
    def check_label(self) -> str:
        """What a passed check means, in the words ``models list`` and the fetch use."""
        if self.full_digest:
            return "verified (sha256)"
        return f"prefix-verified (sha256 {self.sha256}…, torchvision's own check)"

    def matches(self, digest: str) -> bool:
        return digest.startswith(self.sha256)


def _mib_bounds(mib: float) -> tuple[int, int]:
    """torchvision's ``_file_size`` (MiB, rounded to 3 decimals) as bounds in bytes."""
    return math.floor((mib - 0.0005) * MiB), math.ceil((mib + 0.0005) * MiB)


# Full digests of the torchvision files: not published by PyTorch, which publishes the 8-digit prefix in each file's
# name. resnet50's and efficientnet_b0's full SHA-256 and exact sizes are as recorded by independent public projects
# that hashed the files downloaded from these URLs (found with a public code search: more than five agree on each,
# e.g. a weights catalog listing "resnet50-0676ba61.pth 102,530,333 B" and "efficientnet_b0_rwightman-7f5810bc.pth
# 21,444,401 B" with these digests); both begin with torchvision's prefix and match torchvision's _file_size (97.781
# and 20.451 MiB). For mobilenet_v2-b0353104.pth no full digest was found: its prefix is recorded, and its size bound
# comes from torchvision's _file_size (13.555 MiB).
_TORCHVISION = "https://download.pytorch.org/models/"
MODEL_FILES: dict[str, ModelFile] = {
    entry.name: entry
    for entry in (
        ModelFile(
            "mobilenet_v2",
            _TORCHVISION + "mobilenet_v2-b0353104.pth",  # torchvision MobileNet_V2_Weights.IMAGENET1K_V1.url
            "mobilenet_v2-b0353104.pth",
            "torchvision",
            "b0353104",
            *_mib_bounds(13.555),
            digest_source="torchvision's file name (the prefix torch.hub checks)",
            description="MobileNetV2 ImageNet weights (torchvision IMAGENET1K_V1)",
        ),
        ModelFile(
            "resnet50",
            _TORCHVISION + "resnet50-0676ba61.pth",  # ResNet50_Weights.IMAGENET1K_V1.url
            "resnet50-0676ba61.pth",
            "torchvision",
            "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
            102_530_333,
            102_530_333,
            digest_source="independent public records of the file at this URL (see models/files.py)",
            description="ResNet-50 ImageNet weights (torchvision IMAGENET1K_V1)",
        ),
        ModelFile(
            "efficientnet_b0",
            _TORCHVISION + "efficientnet_b0_rwightman-7f5810bc.pth",  # EfficientNet_B0_Weights.IMAGENET1K_V1.url
            "efficientnet_b0_rwightman-7f5810bc.pth",
            "torchvision",
            "7f5810bc96def8f7552d5b7e68d53c4786f81167d28291b21c0d90e1fca14934",
            21_444_401,
            21_444_401,
            digest_source="independent public records of the file at this URL (see models/files.py)",
            description="EfficientNet-B0 ImageNet weights (torchvision IMAGENET1K_V1)",
        ),
        # OpenCV Zoo's YuNet (Apache-2.0). The file is stored with Git LFS: its pointer in opencv/opencv_zoo
        # (models/face_detection_yunet/face_detection_yunet_2023mar.onnx, commit 82b38c8f98e7b52aa171400f3e4c72235
        # 2d0669f) records "oid sha256:8f2383e4...2552fa4, size 232589", the digest of ../shared/assets/weights/face/
        # yunet_s_640_640.onnx computed here. github.com answers the raw URL with a redirect to
        # media.githubusercontent.com, which serves LFS files.
        ModelFile(
            "yunet",
            "https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/face_detection_yunet_2023mar.onnx",
            "face_detection_yunet_2023mar.onnx",
            "deeptarget",
            "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
            232_589,
            232_589,
            digest_source="opencv/opencv_zoo's Git LFS pointer for the file",
            hosts=("media.githubusercontent.com", "raw.githubusercontent.com"),
            description="YuNet face detector (OpenCV Zoo, 2023mar)",
        ),
    )
}
WEIGHTS_FILES = ("mobilenet_v2", "resnet50", "efficientnet_b0")  # the registry's name of each backbone's weights
FACE_FILE = "yunet"


def torch_hub_dir() -> Path:
    """torchvision's cache, as torch.hub computes it ($TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub, else
    ~/.cache/torch/hub; ``torch.hub.set_dir`` in this process wins)."""
    import torch.hub  # only the commands and stages that load models pay for torch

    return Path(torch.hub.get_dir())


def cache_path(entry: ModelFile, files_dir: Path | None = None) -> Path:
    """Where the code looks for ``entry`` (``files_dir``: ``settings.model_files_dir``, for deeptarget's own)."""
    if entry.cache == "torchvision":
        return torch_hub_dir() / "checkpoints" / entry.file_name
    if files_dir is None:
        raise ValueError(f"{entry.name} lives in deeptarget's model cache: give settings.model_files_dir")
    return files_dir / entry.file_name


def sha256_of(path: Path, chunk: int = 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileCheck:
    """A file where the code looks for ``entry``: absent, or present and its check passed (``ok``) or not."""

    entry: ModelFile
    path: Path
    present: bool
    ok: bool = False
    digest: str | None = None
    size: int | None = None

    @property
    def status(self) -> str:
        if not self.present:
            return "absent"
        if self.ok:
            return self.entry.check_label
        return f"FAILED verification ({self.problem})"

    @property
    def problem(self) -> str:
        """Why a present file fails its check."""
        entry = self.entry
        if self.size is not None and not entry.min_size <= self.size <= entry.max_size:
            expected = entry.exact_size or f"{entry.min_size} to {entry.max_size}"
            return f"{self.size} bytes, expected {expected}"
        return f"sha256 {self.digest}, expected {entry.sha256}{'' if entry.full_digest else '…'}"


# A file hashed once per process unless it changes (the embedder, the pipeline and `models list` all check).
_checked: dict[tuple[str, int, int, str], FileCheck] = {}


def check_file(entry: ModelFile, path: Path) -> FileCheck:
    """Hash ``path`` and compare it with ``entry``'s digest and size."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return FileCheck(entry, path, present=False)
    if not path.is_file():
        return FileCheck(entry, path, present=True, ok=False, size=None, digest="(not a regular file)")
    key = (str(path), stat.st_size, stat.st_mtime_ns, entry.sha256)
    if key in _checked:
        return _checked[key]
    if not entry.min_size <= stat.st_size <= entry.max_size:
        result = FileCheck(entry, path, present=True, ok=False, size=stat.st_size)
    else:
        digest = sha256_of(path)
        result = FileCheck(entry, path, True, entry.matches(digest), digest, stat.st_size)
    _checked[key] = result
    return result


def weights_file_entry(backbone: str, registry: Mapping[str, ModelFile] = MODEL_FILES) -> ModelFile:
    return registry[backbone]


@dataclass(frozen=True)
class WeightsChoice:
    """What ``weights`` means for ``backbone`` on this machine: ``weights`` resolved ('imagenet', 'none' or a
    path), the file it loads (None for 'none'), whether that file passed its check, a ``warning`` to log, or an
    ``error`` (the embedder refuses to start)."""

    weights: str
    path: Path | None = None
    check: FileCheck | None = None
    warning: str | None = None
    error: str | None = None

    @property
    def shown(self) -> str:
        if self.error:
            return f"{self.weights}: {self.error}"
        if self.weights == "none":
            return "random weights (seeded)"
        if self.weights == "imagenet" and self.check is not None:
            return f"imagenet ({self.check.path}, {self.check.status})"
        return f"file {self.path}"


def weights_choice(backbone: str, weights: str, registry: Mapping[str, ModelFile] = MODEL_FILES) -> WeightsChoice:
    """``auto``: ImageNet weights when torchvision's file is in its cache and passes its check, else random weights
    with a warning naming the fetch; ``imagenet``: the same file, required; anything else passes through."""
    if weights not in ("auto", "imagenet"):
        return WeightsChoice(weights, None if weights == "none" else Path(weights))
    entry = weights_file_entry(backbone, registry)
    check = check_file(entry, cache_path(entry))
    if check.ok:
        return WeightsChoice("imagenet", check.path, check)
    if weights == "imagenet":
        if check.present:
            error = (
                f"pretrained {backbone} weights at {check.path} fail verification ({check.problem}): delete the file "
                f"and run `{FETCH_HINT} {entry.name}`, or set weights to a .pth path or 'none'"
            )
        else:
            error = (
                f"pretrained {backbone} weights are not in torchvision's cache and deeptarget does not download at "
                f"run time: run `{FETCH_HINT} {entry.name}` (or put {entry.file_name} from {entry.url} at "
                f"{check.path}), or set weights to a .pth path or 'none'"
            )
        return WeightsChoice("imagenet", check.path, check, error=error)
    if check.present:
        warning = (
            f"{check.path} fails verification ({check.problem}) and is NOT used: embeddings come from RANDOM weights. "
            f"Delete it and run `{FETCH_HINT} {entry.name}`"
        )
    else:
        warning = (
            f"no pretrained {backbone} weights: embeddings come from RANDOM weights. For ImageNet weights run "
            f"`{FETCH_HINT} {entry.name}` (it puts {entry.file_name} at {check.path}), or set DEEPTARGET_WEIGHTS to "
            "a .pth file"
        )
    return WeightsChoice("none", None, check, warning=warning)


def face_model_file(settings: Settings, registry: Mapping[str, ModelFile] = MODEL_FILES) -> Path | None:
    """The YuNet file the face detector gets: ``face_model_path`` when set (the operator's own file, used as given),
    else the fetched one when it is in deeptarget's model cache and passes its check (a file that fails is not used,
    with a warning), else None."""
    if settings.face_model_path is not None:
        return settings.face_model_path
    entry = registry[FACE_FILE]
    check = check_file(entry, cache_path(entry, settings.model_files_dir))
    if check.ok:
        return check.path
    if check.present:
        LOG.warning(
            "%s fails verification (%s) and is NOT used as the YuNet face model: delete it and run `%s %s`",
            check.path,
            check.problem,
            FETCH_HINT,
            entry.name,
        )
    return None


def needed_files(settings: Settings, registry: Mapping[str, ModelFile] = MODEL_FILES) -> list[ModelFile]:
    """The files the configuration would use: the backbone's ImageNet weights when weights are auto/imagenet, YuNet
    when the face detector is auto/yunet with no face_model_path of the operator's."""
    needed = []
    if settings.weights in ("auto", "imagenet"):
        needed.append(weights_file_entry(settings.backbone, registry))
    if (
        settings.face_policy != "off"
        and settings.face_detector in ("auto", "yunet")
        and settings.face_model_path is None
    ):
        needed.append(registry[FACE_FILE])
    return needed


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
