"""Your own classification network as a model: its penultimate features and its last layer.

A user who brings a trained classifier gets a third model next to the paper's two: "your
network's last layer", a logistic regression on the network's penultimate features (the input of
its final linear layer), initialised from the network's own head and refitted to convergence, the
lower layers frozen — what Koh & Liang did for Inception v3. This module loads the network safely,
finds its final linear layer, and exposes the features through the :class:`~core.features.Featurizer`
interface; :mod:`core.explainer` fits and explains the head.

Two ways to give a network, :class:`NetworkSpec`:

- **a torchvision architecture and a state dict**: ``NetworkSpec("resnet18", weights="pets.pt")``.
  The file is read with ``torch.load(..., weights_only=True)`` (torch's allow-listed unpickler:
  tensors and plain containers only, no arbitrary objects, no code). The number of classes is read
  from the shape of the final layer's weight in the file. Preprocessing (input size, mean, std)
  comes from ``torchvision.models.get_model_weights(arch).DEFAULT.transforms()``, the pipeline a
  fine-tuned network started from, unless options override it.
- **a ``torch.export`` program** (``.pt2``, from ``torch.export.save``):
  ``NetworkSpec("pets.pt2")``. Its input size is read from the program's input shape when static.

**Can ``torch.export.load`` execute code from the file?** Yes (torch 2.14.1, verified by
``tests/core/test_user_network.py::test_torch_export_load_itself_runs_code_from_the_file``, which
builds each file below and watches a marker file appear). Three routes, all from the file's
contents:

1. ``torch._export.serde.serialize.deserialize_torch_artifact`` reads the sample inputs with
   ``torch.load(weights_only=True)`` and, when that fails, *retries with* ``weights_only=False``,
   i.e. full pickle: a crafted ``data/sample_inputs/model.pt`` runs arbitrary code during
   ``torch.export.load``. Weights and constants whose config says ``use_pickle`` are read with
   ``torch.load(weights_only=False)`` too, "opaque" constants with ``pickle.loads``, and custom
   objects with TorchScript's unpickler (``_load_state_dict`` / ``_load_constants`` in
   ``torch/export/pt2_archive/_package.py``).
2. Symbolic shape expressions (``expr_str`` strings in ``models/model.json``) are parsed with
   ``sympy.sympify`` (``ExportedProgramDeserializer._parse_sym_expr``), which evaluates Python:
   ``__import__('os').system(...)`` as a tensor size runs during ``torch.export.load``.
3. ``guards_code`` strings in ``models/model.json`` are pasted into Python source that
   ``ExportedProgram.module()`` ``exec``-s (``torch/export/_unlift.py``,
   ``_convert_guards_code_to_fn``); the code runs on the module's first call.

Also: pytree specs may name an ``"__enum__"`` whose module torch imports
(``torch.utils._pytree.enum_object_hook``), and attribute paths (parameter names) are pasted into
generated Python source.

So a ``.pt2`` file is checked *before* torch sees it (:func:`check_export_archive`), on the very
bytes that are then loaded from memory (no second read of the path), with torch's own zip reader so
both see the same entries: only the entries ``torch.export.save`` writes for one program (no
AOTInductor or ExecuTorch payloads, no legacy pickled weights); every weight and constant raw
bytes (``use_pickle`` false, no custom or opaque objects); sample inputs that load with
``weights_only=True`` (so torch never falls back); every ``expr_str`` sympy's ``srepr`` of plain
arithmetic over shape symbols (strings only as symbol names or numbers; no attributes, subscripts,
powers, factorials or unknown functions); no guard code;
no ``__enum__``; every node an ATen operator (``torch.ops.aten.*``) or a small allow-list of integer
operators (no higher-order operators, no custom operators, no nested graphs); every parameter
name a dotted path of identifiers or indices. After loading, the graph is checked again
(:func:`_check_loaded_program`). Anything else is refused with a message; nothing from the file is
executed except ATen operators on tensors.

Either way the network is run in inference mode only, and the loader checks that the network's
output *is* its final linear layer applied to the captured features (so the "head" explained is
the network's own), and that an image's features do not depend on the rest of the batch (a
network saved in training mode, with batch statistics, would fail this).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import io
import json
import math
import operator
import os
import re
import stat
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import NetworkError
from core.features import Featurizer, check_images

#: Largest weights or ``.pt2`` file read (the upload limit; a resnet50 state dict is ~100 MB).
MAX_WEIGHTS_BYTES = 200 * 2**20
#: torchvision's ImageNet normalisation, the default when nothing else is known.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = 224
#: What the third model's scores explain, for every front end (docs/architecture.md quotes it).
WHAT_IS_EXPLAINED = (
    "What these scores explain. For your network, the scores describe its last layer refitted to "
    "convergence on the features your network computes, with every lower layer frozen — the "
    "setting in which Koh & Liang explained Inception v3. A score says how the test loss of that "
    "layer would change if the training image were removed and the layer refitted, with the "
    "features unchanged. It does not say what retraining or fine-tuning the whole network without "
    "that image would do: the lower layers learned from the same images, and influence through "
    "them is not included (and, for deep networks, known to be fragile — see the Trust page). The "
    "refitted layer is not exactly your network's head either: it is the best layer for these "
    "training images at the chosen λ; the agreement with your head's predictions is shown next to "
    "it."
)
#: Bump when the feature definition or preprocessing code changes (part of cache keys).
FEATURES_VERSION = "1"

_EXPORT_SUFFIX = ".pt2"
# Checkpoint wrappers people save around a state dict (torch.save({"state_dict": ...})).
_STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model", "net")
# How many names a mismatch message lists before "and N more".
_SHOWN = 4


# ------------------------------------------------------------------------------------ the spec
@dataclass(frozen=True)
class NetworkSpec:
    """A user's classification network, by reference (frozen and hashable: part of a config).

    Attributes:
        network: a torchvision classification architecture name (``"resnet18"``; see
            :func:`architecture_names`), or the path of a ``torch.export`` program (``.pt2``).
        weights: with an architecture name, the state dict file (required); with a ``.pt2``,
            ``None`` (the program holds its weights).
        input_size: side of the square input the network takes; ``None`` = from torchvision's
            weight metadata for the architecture, the program's static input shape, or 224.
        mean, std: per-channel normalisation of pixels scaled to [0, 1]; ``None`` = torchvision's
            metadata for the architecture, else ImageNet's.
    """

    network: str
    weights: str | None = None
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.network, str) or not self.network.strip():
            raise NetworkError(
                "network must name a torchvision architecture (e.g. 'resnet18') or a .pt2 file."
            )
        if self.is_export and self.weights is not None:
            raise NetworkError(
                f"network {self.network!r} is a torch.export program, which holds its own "
                "weights; give no weights file with it."
            )
        if not self.is_export:
            if Path(self.network).suffix or os.sep in self.network:
                raise NetworkError(
                    f"network {self.network!r} looks like a file but is not a .pt2 program. Give "
                    "an architecture name with a state dict (network='resnet18', "
                    f"weights='{self.network}'), or a torch.export program saved as .pt2."
                )
            if not self.weights:
                raise NetworkError(
                    f"network {self.network!r} is an architecture name, so weights must name its "
                    "state dict file (torch.save(model.state_dict(), PATH))."
                )
        if self.input_size is not None and not (
            isinstance(self.input_size, int) and 8 <= self.input_size <= 1024
        ):
            raise NetworkError(
                f"input_size must be an integer between 8 and 1024 or None; got {self.input_size!r}."
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise NetworkError(f"{name} must be three numbers; got {value!r}.") from None
            if len(value) != 3 or not all(math.isfinite(v) for v in value):
                raise NetworkError(f"{name} must be three finite numbers (R, G, B); got {value!r}.")
            if name == "std" and not all(v > 0 for v in value):
                raise NetworkError(f"std must be three numbers > 0; got {value!r}.")
            object.__setattr__(self, name, value)

    @property
    def is_export(self) -> bool:
        """True for a ``torch.export`` program file (``.pt2``)."""
        return self.network.lower().endswith(_EXPORT_SUFFIX)

    @property
    def files(self) -> tuple[str, ...]:
        """The files this spec reads."""
        return (self.network,) if self.is_export else (str(self.weights),)

    @property
    def short_name(self) -> str:
        """For labels: ``"resnet18, pets.pt"`` or ``"pets.pt2"``."""
        if self.is_export:
            return Path(self.network).name
        return f"{self.network}, {Path(str(self.weights)).name}"


@dataclass(frozen=True)
class Preprocessing:
    """How images become the network's input, shown to the user.

    Attributes:
        input_size: (height, width) the whole image is resized to (bilinear, antialiased; no
            centre crop, so every pixel the user sees is explained).
        mean, std: per-channel normalisation of pixels scaled to [0, 1].
        source: where these came from, e.g. "torchvision's ResNet18_Weights.IMAGENET1K_V1".
    """

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str

    def describe(self) -> str:
        h, w = self.input_size
        mean = ", ".join(f"{v:g}" for v in self.mean)
        std = ", ".join(f"{v:g}" for v in self.std)
        return (
            f"whole image resized to {h}x{w} (bilinear, antialiased), grey replicated to RGB, "
            f"pixels/255 normalised with mean ({mean}) and std ({std}); {self.source}"
        )


@dataclass(frozen=True)
class NetworkInfo:
    """What was loaded, for reports and JSON.

    Attributes:
        kind: "torchvision" (architecture + state dict) or "torch.export".
        architecture: torchvision name, or "torch.export program".
        file: the weights or program file.
        sha256: of that file's bytes.
        n_classes: outputs of the final linear layer.
        feature_dim: its inputs (the penultimate features' dimension).
        head: where the final linear layer is (module name, or the graph node).
        parameters: number of parameters of the whole network.
        preprocessing: how images are fed to it.
        batch_size: a program exported with a fixed batch size is run in batches of exactly that
            many images (padded); ``None`` = any batch size.
        load_seconds: time to read, check and load.
    """

    kind: str
    architecture: str
    file: str
    sha256: str
    n_classes: int
    feature_dim: int
    head: str
    parameters: int
    preprocessing: Preprocessing
    batch_size: int | None
    load_seconds: float


class _Captured(Exception):
    """Raised by the head's pre-hook to stop the forward pass with the head's input."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        self.features = features


class UserNetwork:
    """A loaded network: penultimate features and the head that maps them to logits.

    Attributes:
        info: what was loaded.
        head_weight: (C, d) float64, the final linear layer's weight.
        head_bias: (C,) float64 (zeros when the layer has no bias).
    """

    def __init__(
        self,
        info: NetworkInfo,
        features: torch.nn.Module,
        head_weight: torch.Tensor,
        head_bias: torch.Tensor,
    ) -> None:
        self.info = info
        self._features = features
        self.head_weight = head_weight.detach().to(torch.float64)
        self.head_bias = head_bias.detach().to(torch.float64)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (N, 3, H, W) float32, already normalised. Returns: (N, d) float32 features."""
        batch = self.info.batch_size
        if batch is None or len(x) == batch:
            return _flatten_features(self._features(x))
        # A program exported with a static batch size: run exactly that many at a time.
        chunks = []
        for start in range(0, len(x), batch):
            chunk = x[start : start + batch]
            missing = batch - len(chunk)
            if missing:
                chunk = torch.cat([chunk, chunk[-1:].expand(missing, *chunk.shape[1:])])
            chunks.append(_flatten_features(self._features(chunk))[: batch - missing])
        return torch.cat(chunks)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The network's own head on (m, d) features. Returns: (m, C) float64."""
        return torch.as_tensor(features, dtype=torch.float64) @ self.head_weight.T + self.head_bias


def _flatten_features(features: torch.Tensor) -> torch.Tensor:
    if features.ndim != 2:
        # nn.Linear accepts (..., d); a head applied per position is not a classifier's head.
        raise NetworkError(
            f"the final linear layer's input has shape {tuple(features.shape)}, not (batch, "
            "features); it is not a classification head over one feature vector per image."
        )
    return features


# ---------------------------------------------------------------------------- the featurizer
class NetworkFeaturizer(Featurizer):
    """Images -> the user's network's penultimate features (the input of its final linear layer).

    Loading is lazy and done once (thread-safe); :meth:`load` does it now and raises
    :class:`~core.errors.NetworkError` with a message for anything wrong with the network.

    Preprocessing (see :class:`Preprocessing`): grayscale replicated to RGB, the whole image resized
    to the input size (bilinear, antialiased), pixels / 255, normalised per channel.
    """

    name = "network"
    dtype = torch.float32

    def __init__(self, spec: NetworkSpec) -> None:
        self.spec = spec
        self._network: UserNetwork | None = None
        self._lock = threading.Lock()

    # -- identity (cache keys) ----------------------------------------------------------------
    @property
    def label(self) -> str:  # type: ignore[override]
        return f"your network {self.spec.short_name}"

    @property
    def dim(self) -> int:  # type: ignore[override]
        return self.load().info.feature_dim

    @property
    def version(self) -> str:  # type: ignore[override]
        info = self.load().info
        p = info.preprocessing
        return (
            f"{FEATURES_VERSION}:{info.kind}:{info.architecture}:head={info.head}:"
            f"resize{p.input_size[0]}x{p.input_size[1]}-bilinear-aa:mean={p.mean}:std={p.std}"
        )

    @property
    def weights_id(self) -> str:
        return self.load().info.sha256[:16]

    # -- loading ------------------------------------------------------------------------------
    def load(self) -> UserNetwork:
        """Read, check and load the network (once). Raises NetworkError with a message."""
        if self._network is None:
            with self._lock, torch.inference_mode(False):
                if self._network is None:
                    self._network = load_network(self.spec)
        return self._network

    def _before_transform(self) -> None:
        self.load()

    # -- the feature map ----------------------------------------------------------------------
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) pixels in [0, 255] -> (N, 3, S, S) normalised float32, differentiably."""
        check_images(x, what="x")
        p = self.load().info.preprocessing
        h = x.to(torch.float32).permute(0, 3, 1, 2)
        if h.shape[1] == 1:
            h = h.expand(-1, 3, -1, -1)
        if tuple(h.shape[-2:]) != p.input_size:
            h = F.interpolate(
                h, size=p.input_size, mode="bilinear", align_corners=False, antialias=True
            )
        mean = torch.tensor(p.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(p.std, dtype=torch.float32).view(1, 3, 1, 1)
        return (h / 255.0 - mean) / std

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (N, H, W, C) in [0, 255]. Returns: (N, d) float32 penultimate features."""
        return self.load().penultimate(self.prepare(x))

    def logits(self, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """The network's own output for (N, H, W, C) uint8 images. Returns: (N, C) float64."""
        return (
            self.load()
            .logits(torch.as_tensor(self.transform(images, batch_size=batch_size)))
            .numpy()
        )


# ------------------------------------------------------------------------------- the head
def head_initialisation(
    weight: torch.Tensor, bias: torch.Tensor, classes: Sequence[int]
) -> torch.Tensor:
    """The network's own head restricted to ``classes``, as parameters of
    ``LogisticRegression(fit_intercept=True)`` (the bias is the weight of the constant feature).

    For two classes the model is binary, p(second class) = σ(wᵀφ + b), and the head's two logits
    z_0, z_1 give the same probabilities with w = W[c_1] − W[c_0], b = b[c_1] − b[c_0]. For more,
    the softmax takes the head's rows as they are.

    Args:
        weight: (C, d) the head's weight; bias: (C,).
        classes: the network's output indices of the chosen classes, in the model's label order.

    Returns:
        θ of length (d + 1) for two classes, (d + 1)·k for k > 2, laid out θ[j·k + c] = M[j, c]
        with M = [Wᵀ; bᵀ] as in :mod:`core.models`.
    """
    rows = torch.as_tensor(list(classes), dtype=torch.int64)
    w, b = weight.to(torch.float64)[rows], bias.to(torch.float64)[rows]
    if len(rows) == 2:
        return torch.cat([w[1] - w[0], (b[1] - b[0]).reshape(1)])
    return torch.cat([w.T, b[None, :]]).reshape(-1)


# ------------------------------------------------------------------------------------ loading
def architecture_names() -> list[str]:
    """torchvision's classification architectures (``torchvision.models.list_models``)."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def load_network(spec: NetworkSpec) -> UserNetwork:
    """Load and check the network a spec names.

    Raises:
        NetworkError: unknown architecture; a missing, oversized, non-regular or unreadable file;
            a file that is not a state dict (or is a pickled model); weights that do not fit the
            architecture (the first few missing / unexpected keys and shape mismatches named); a
            ``.pt2`` that is not a safe single-input ``torch.export`` program; no final linear
            layer; a final layer whose output is not the network's output; features that depend
            on the rest of the batch (training mode).
    """
    identity = (spec, *(_file_identity(p) for p in spec.files))
    with _CACHE_LOCK:
        if identity in _CACHE:
            _CACHE.move_to_end(identity)
            return _CACHE[identity]
    start = time.perf_counter()
    network = _load_export(spec, start) if spec.is_export else _load_torchvision(spec, start)
    if None not in identity:
        with _CACHE_LOCK:
            _CACHE[identity] = network
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return network


# Loaded networks by spec and file identity (device, inode, size, modification time): the command
# line checks a network before opening the dataset and the explainer then reuses it, and the
# dashboard's explainers for several class pairs share one. A changed file is loaded afresh.
_CACHE: OrderedDict[tuple[Any, ...], UserNetwork] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def _file_identity(path: str) -> tuple[int, int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def read_weights_file(path: str | os.PathLike[str], what: str) -> bytes:
    """The bytes of a regular file of at most :data:`MAX_WEIGHTS_BYTES`, read once.

    Raises:
        NetworkError: missing, a directory or other non-regular file (a FIFO is refused without
            waiting for a writer), unreadable, or too large.
    """
    name = os.fspath(path)
    try:
        info = os.stat(name)
    except FileNotFoundError:
        raise NetworkError(f"{what} {name} does not exist.") from None
    except OSError as error:
        raise NetworkError(f"{what} {name} could not be read: {error.strerror}.") from None
    if stat.S_ISDIR(info.st_mode):
        raise NetworkError(f"{what} {name} is a directory, not a file.")
    if not stat.S_ISREG(info.st_mode):
        raise NetworkError(f"{what} {name} is not a regular file (a pipe or device?); refused.")
    try:
        descriptor = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(descriptor, "rb") as stream:
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                raise NetworkError(f"{what} {name} is not a regular file; refused.")
            data = stream.read(MAX_WEIGHTS_BYTES + 1)
    except OSError as error:
        raise NetworkError(f"{what} {name} could not be read: {error.strerror}.") from None
    if len(data) > MAX_WEIGHTS_BYTES:
        raise NetworkError(
            f"{what} {name} is larger than the {MAX_WEIGHTS_BYTES // 2**20} MB limit for "
            "network files."
        )
    if not data:
        raise NetworkError(f"{what} {name} is empty (0 bytes).")
    return data


# -- torchvision architecture + state dict ------------------------------------------------------
def _check_architecture(name: str) -> None:
    names = architecture_names()
    if name in names:
        return
    close = difflib.get_close_matches(name.lower(), names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise NetworkError(
        f"unknown architecture {name!r}: not one of torchvision's {len(names)} classification "
        f"models.{hint} (torchvision.models.list_models(module=torchvision.models) lists them.)"
    )


def _builder_options(arch: str, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor options a state dict implies but does not store."""
    if arch == "inception_v3":
        # Fine-tuning starts from torchvision's ImageNet model, built with transform_input=True
        # (its weights came from TensorFlow and expect (x - 0.5) / 0.5 inside the network).
        return {
            "aux_logits": any(k.startswith("AuxLogits.") for k in state),
            "transform_input": True,
            "init_weights": False,
        }
    if arch == "googlenet":
        return {
            "aux_logits": any(k.startswith(("aux1.", "aux2.")) for k in state),
            "transform_input": True,
            "init_weights": False,
        }
    return {}


def _preprocessing_from_torchvision(arch: str, spec: NetworkSpec) -> Preprocessing:
    import torchvision

    size, mean, std, source = DEFAULT_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD, ""
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        transforms = weights.transforms()
        size = int(transforms.crop_size[0])
        mean = tuple(float(v) for v in transforms.mean)  # type: ignore[assignment]
        std = tuple(float(v) for v in transforms.std)  # type: ignore[assignment]
        source = f"from torchvision's {type(weights).__name__}.{weights.name} transforms"
    except Exception:  # no registered weights: fall back to the ImageNet defaults
        source = "ImageNet defaults (torchvision has no weight metadata for this architecture)"
    return _apply_options(spec, (size, size), mean, std, source)


def _apply_options(
    spec: NetworkSpec,
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    source: str,
) -> Preprocessing:
    overridden = [
        name
        for name, value in (("input size", spec.input_size), ("mean", spec.mean), ("std", spec.std))
        if value is not None
    ]
    if overridden:
        source = f"{source}; {', '.join(overridden)} from options"
    return Preprocessing(
        input_size=(spec.input_size, spec.input_size) if spec.input_size else size,
        mean=tuple(spec.mean or mean),  # type: ignore[arg-type]
        std=tuple(spec.std or std),  # type: ignore[arg-type]
        source=source,
    )


def _read_state_dict(data: bytes, path: str) -> dict[str, torch.Tensor]:
    what = f"weights file {path}"
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError, ...
        text = str(error)
        if "Unsupported global" in text:  # the allow-listed unpickler met a class or function
            raise NetworkError(
                f"{what} holds Python objects other than tensors (e.g. a whole model saved with "
                "torch.save(model)), which would need arbitrary unpickling; refused. Save "
                "model.state_dict() instead: torch.save(model.state_dict(), PATH)."
            ) from None
        raise NetworkError(
            f"{what} is not a PyTorch state dict (torch.load(weights_only=True) failed: "
            f"{type(error).__name__}: {_first_line(text)}). Save it with "
            "torch.save(model.state_dict(), PATH)."
        ) from None
    state = _unwrap_state_dict(state, what)
    return state


def _unwrap_state_dict(state: Any, what: str) -> dict[str, torch.Tensor]:
    if isinstance(state, Mapping) and not _is_tensor_mapping(state):
        for key in _STATE_DICT_WRAPPERS:
            if key in state and _is_tensor_mapping(state[key]):
                state = state[key]
                break
    if not _is_tensor_mapping(state):
        kind = type(state).__name__
        if isinstance(state, Mapping):
            bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)][:_SHOWN]
            kind = f"mapping with non-tensor entries ({', '.join(bad)})"
        raise NetworkError(
            f"{what} holds a {kind}, not a state dict of tensors. Save it with "
            "torch.save(model.state_dict(), PATH)."
        )
    if not state:
        raise NetworkError(f"{what} is an empty state dict.")
    keys = list(state)
    # nn.DataParallel / DistributedDataParallel prefix every key with "module.".
    if all(k.startswith("module.") for k in keys):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _is_tensor_mapping(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def _linear_call_order(model: torch.nn.Module, probe: torch.Tensor) -> list[str]:
    """Names of the nn.Linear modules in the order a forward pass reaches them."""
    calls: list[str] = []
    hooks = [
        module.register_forward_pre_hook(lambda _m, _a, name=name: calls.append(name))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def _find_head_name(arch: str, options: dict[str, Any], size: tuple[int, int]) -> str | None:
    """The final linear layer of ``arch`` as built by default, without allocating its weights
    (on the meta device; falls back to a real build for the few models that need one)."""
    import torchvision

    def probe(device: str) -> list[str]:
        with torch.device(device):
            model = torchvision.models.get_model(arch, weights=None, **options).eval()
            return _linear_call_order(model, torch.zeros(2, 3, *size))

    try:
        calls = probe("meta")
    except Exception:
        try:
            calls = probe("cpu")
        except Exception as error:
            raise NetworkError(
                f"{arch} could not run on a {size[0]}x{size[1]} image ({type(error).__name__}: "
                f"{_first_line(str(error))}); give its input size (--network-input-size)."
            ) from None
    return calls[-1] if calls else None


def _no_linear_layer(what: str) -> NetworkError:
    return NetworkError(
        f"{what} has no final linear layer (nn.Linear) in its forward pass, so there is no "
        "last layer to refit (e.g. SqueezeNet classifies with a convolution). Use a network "
        "whose classifier ends in a linear layer."
    )


def _load_torchvision(spec: NetworkSpec, start: float) -> UserNetwork:
    import torchvision

    arch = spec.network
    _check_architecture(arch)
    path = str(spec.weights)
    data = read_weights_file(path, "weights file")
    state = _read_state_dict(data, path)
    preprocessing = _preprocessing_from_torchvision(arch, spec)
    options = _builder_options(arch, state)
    head_name = _find_head_name(arch, options, preprocessing.input_size)
    if head_name is None:
        raise _no_linear_layer(f"architecture {arch}")
    head_key = f"{head_name}.weight"
    if head_key in state and state[head_key].ndim == 2:
        options["num_classes"] = int(state[head_key].shape[0])
    try:
        model = torchvision.models.get_model(arch, weights=None, **options)
    except Exception as error:
        raise NetworkError(
            f"{arch} could not be built with {options}: {type(error).__name__}: "
            f"{_first_line(str(error))}"
        ) from None
    _load_matching(model, state, arch, path)
    model = model.float().eval().requires_grad_(False)
    head = model.get_submodule(head_name)
    if not isinstance(head, torch.nn.Linear):  # pragma: no cover - found by type above
        raise _no_linear_layer(f"architecture {arch}")

    def features(x: torch.Tensor) -> torch.Tensor:
        hook = head.register_forward_pre_hook(_raise_captured)
        try:
            model(x)
        except _Captured as captured:
            return captured.features
        finally:
            hook.remove()
        raise _no_linear_layer(f"architecture {arch}")  # the head was not reached

    network = UserNetwork(
        NetworkInfo(
            kind="torchvision",
            architecture=arch,
            file=path,
            sha256=hashlib.sha256(data).hexdigest(),
            n_classes=head.out_features,
            feature_dim=head.in_features,
            head=f"module '{head_name}'",
            parameters=sum(p.numel() for p in model.parameters()),
            preprocessing=preprocessing,
            batch_size=None,
            load_seconds=0.0,
        ),
        _FunctionModule(features),
        head.weight,
        head.bias if head.bias is not None else torch.zeros(head.out_features),
    )
    what = f"{arch} with {Path(path).name}"
    _check_head_is_output(network, model, what)
    # From here on the network ends at its head's input: a plain module without hooks, which
    # threads can share (the capturing hook above is only for the checks, during loading).
    probe = torch.randn(2, 3, *preprocessing.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        captured = network.penultimate(probe)
        model.set_submodule(head_name, torch.nn.Identity())
        network._features = model
        ending = network.penultimate(probe)
    if ending.shape != captured.shape or not torch.allclose(ending, captured, rtol=1e-4, atol=1e-5):
        raise NetworkError(
            f"{what}: its output is not its final linear layer's output; something happens "
            "after the last nn.Linear. Give the network that ends in its classification layer."
        )
    return _with_load_time(network, start)


def _raise_captured(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
    raise _Captured(args[0])


class _FunctionModule(torch.nn.Module):
    def __init__(self, function: Any) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


def _load_matching(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], arch: str, path: str
) -> None:
    """load_state_dict(strict) with a message naming the first few differences."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs {arch} {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
            problems.append(f"{title} {', '.join(items[:_SHOWN])}{more}")
    if problems:
        raise NetworkError(
            f"weights file {path} does not fit the {arch} architecture: {'; '.join(problems)}. "
            "Is it the state dict of this architecture (torch.save(model.state_dict(), PATH))?"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # e.g. a dtype that cannot be copied
        raise NetworkError(
            f"weights file {path} could not be loaded into {arch}: {_first_line(str(error))}"
        ) from None


def _check_head_is_output(network: UserNetwork, model: Any, what: str) -> None:
    """The network's output must be its head applied to the captured features, and an image's
    features must not depend on the rest of the batch."""
    size = network.info.preprocessing.input_size
    batch = network.info.batch_size or 3
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(batch, 3, *size, generator=generator)
    try:
        with torch.no_grad():
            output = model(probe)
            features = network.penultimate(probe)
    except NetworkError:
        raise
    except Exception as error:
        raise NetworkError(
            f"{what} failed on a {size[0]}x{size[1]} input ({type(error).__name__}: "
            f"{_first_line(str(error))}). If it takes another input size, give it "
            "(--network-input-size)."
        ) from None
    if isinstance(output, (tuple, list)) and len(output) == 1:
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        raise NetworkError(
            f"{what} does not return one (batch, classes) tensor of logits; got "
            f"{type(output).__name__}{'' if not isinstance(output, torch.Tensor) else tuple(output.shape)}."
        )
    head = network.logits(features.double())
    scale = float(head.abs().max()) + 1e-6
    if output.shape != head.shape or float((output.double() - head).abs().max()) > 1e-3 * scale:
        raise NetworkError(
            f"the output of {what} is not its final linear layer applied to that layer's input "
            "(something happens after the last nn.Linear, e.g. a softmax or another layer). "
            "Give the network that ends in its classification layer."
        )
    if network.info.batch_size is None:
        with torch.no_grad():
            alone = network.penultimate(probe[:1])
        if float((alone - features[:1]).abs().max()) > 1e-3 * (float(features.abs().max()) + 1e-6):
            raise NetworkError(
                f"{what}: an image's features change with the other images in its batch, so the "
                "network is in training mode (BatchNorm batch statistics) or random (dropout). "
                "Call model.eval() before saving or exporting it."
            )


def _with_load_time(network: UserNetwork, start: float) -> UserNetwork:
    network.info = dataclasses.replace(network.info, load_seconds=time.perf_counter() - start)
    return network


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit] + " ..."


# -- torch.export programs ------------------------------------------------------------------------
_ALLOWED_RECORDS = re.compile(
    r"^(?:archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d{1,7}"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d{1,7}"
    r"|extra/[A-Za-z0-9_.-]{1,100})$"
)
_ATEN_TARGET = re.compile(r"^torch\.ops\.aten\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*$")
# Integer arithmetic on symbolic sizes that exported graphs contain; nothing that can grow a
# number without bound (no pow) or touch anything but its arguments.
_INT_OPERATORS = {
    f"_operator.{name}": getattr(operator, name)
    for name in (
        "getitem",
        "add",
        "sub",
        "mul",
        "floordiv",
        "mod",
        "neg",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
    )
}
# torch writes symbolic sizes with sympy.srepr, e.g.
# "Mul(Integer(2), Symbol('s77', positive=True, integer=True))", and reads them back with
# sympy.sympify, which evaluates Python. Only these names, quoted symbol names or numbers, numbers
# and operators may appear; no attribute access, subscripts, other strings, powers or factorials
# (a power or left shift of two literals, or "n!", can make sympy compute a number without
# bound).
_SYMBOL = re.compile(r"^(?:s|u|ps|zf|zuf)\d{1,9}$")
_SYMPY_NAMES = frozenset(
    {
        "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Max", "Min", "Abs", "floor",
        "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "LessThan",
        "StrictLessThan", "GreaterThan", "StrictGreaterThan", "And", "Or", "Not", "true",
        "false", "True", "False", "oo", "Infinity", "NegativeInfinity",
        # torch.utils._sympy.functions, as torch's deserializer names them
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
        "FloorToInt", "CeilDiv", "RShift", "FloatTrueDiv", "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
        "ToFloat",
    }
)  # fmt: skip
#: Assumptions srepr writes as keyword arguments, e.g. Symbol('s0', positive=True).
_SYMPY_KEYWORDS = frozenset(
    {
        "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite",
        "zero", "nonzero", "even", "odd", "commutative", "precision",
    }
)  # fmt: skip
_EXPR_TOKEN = re.compile(
    r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<number>\d{1,30}(?:\.\d{1,30})?)"
    r"|'(?P<quoted>[A-Za-z0-9_.]{1,40})'|(?P<op>//|==|!=|<=|>=|[-+*/%(),<>&|~=]))"
)
_QUOTED_NUMBER = re.compile(r"^\d{1,30}(?:\.\d{1,30})?$")
# Containers a program's input and output specs may use; torch imports the module of others
# (a defaultdict's factory, an enum) by name.
_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict"})
_MAX_EXPR = 500
_FQN_PART = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]{0,200}|\d{1,9})$")
_MAX_MODEL_JSON = 64 * 2**20


def check_export_archive(data: bytes, shown: str) -> None:
    """Refuse a ``.pt2`` file unless ``torch.export.load`` of it can run no code from it.

    See the module docstring for what is checked and why. Reads the archive with torch's own zip
    reader (``torch._C.PyTorchFileReader``, what ``torch.export.load`` uses), so the entries
    checked are the entries loaded.

    Args:
        data: the file's bytes (the caller loads these very bytes afterwards).
        shown: how messages name the file.

    Raises:
        NetworkError: naming the first thing found that is not allowed.
    """
    what = f"{shown} (a torch.export program)"
    if data[:4] != b"PK\x03\x04":
        raise NetworkError(
            f"{shown} is not a torch.export program: a .pt2 file is a zip archive written by "
            "torch.export.save(torch.export.export(model.eval(), (example,)), PATH)."
        )
    try:
        # Python's reader too: it reports compression and duplicate names that torch's hides.
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        raise NetworkError(f"{shown} is not a readable zip archive: {error}.") from None
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise NetworkError(f"{what} has duplicate entries; refused.")
    if any(info.compress_type != zipfile.ZIP_STORED for info in infos):
        raise NetworkError(
            f"{what} has compressed entries; torch.export.save stores them uncompressed. Refused "
            "(a compressed entry could expand far beyond the file's size)."
        )
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = list(reader.get_all_records())
    except Exception as error:
        raise NetworkError(f"{what} could not be opened: {_first_line(str(error))}.") from None
    if len(records) != len(names):
        raise NetworkError(f"{what} lists entries torch's reader and Python's disagree on.")
    for record in records:
        if not _ALLOWED_RECORDS.match(record):
            raise NetworkError(
                f"{what} has an entry {record!r} that a plain exported program does not have "
                "(compiled code, ExecuTorch or legacy pickled data); refused."
            )
    if sum(reader.get_record_size(r) for r in records) > len(data):
        raise NetworkError(f"{what} declares more data than the file holds; refused.")

    def read(record: str) -> bytes:
        if record not in records:
            raise NetworkError(f"{what} has no {record}; is it a file from torch.export.save?")
        return bytes(reader.get_record(record))

    if read("archive_format").decode(errors="replace") != "pt2":
        raise NetworkError(f"{what} is not a pt2 archive (archive_format).")
    for kind, prefix in (("weights", "weight_"), ("constants", "tensor_")):
        config = _json(read(f"data/{kind}/model_{kind}_config.json"), what, f"{kind} config")
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise NetworkError(f"{what} has a malformed {kind} config.")
        for fqn, entry in entries.items():
            _check_fqn(fqn, what)
            if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
                raise NetworkError(
                    f"{what} stores {kind} entry {fqn!r} as a pickle, which would be unpickled "
                    "with arbitrary code; refused. Re-export it with plain tensors."
                )
            path_name = entry.get("path_name")
            if not (isinstance(path_name, str) and re.fullmatch(rf"{prefix}\d{{1,7}}", path_name)):
                raise NetworkError(
                    f"{what}: {kind} entry {fqn!r} is not a plain tensor ({path_name!r}); refused."
                )
            if not isinstance(entry.get("tensor_meta"), dict):
                raise NetworkError(f"{what}: {kind} entry {fqn!r} has no tensor description.")
    _check_sample_inputs(read("data/sample_inputs/model.pt"), what)
    model_bytes = read("models/model.json")
    if len(model_bytes) > _MAX_MODEL_JSON:
        raise NetworkError(f"{what} has an implausibly large graph description; refused.")
    _check_model_json(model_bytes, what)


def _json(data: bytes, what: str, part: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise NetworkError(f"{what} has an unreadable {part}: {error}.") from None


def _check_fqn(fqn: Any, what: str) -> None:
    if not isinstance(fqn, str) or not all(_FQN_PART.match(p) for p in fqn.split(".")):
        raise NetworkError(
            f"{what} names a parameter {str(fqn)[:80]!r}, which is not a dotted path of Python "
            "identifiers; refused (torch pastes these names into generated code)."
        )


def _check_sample_inputs(data: bytes, what: str) -> None:
    # torch.export.load reads these with weights_only=True and, if that fails, retries with full
    # pickle. Loading them the same way first means torch's first attempt succeeds too.
    try:
        value = torch.load(io.BytesIO(data), weights_only=True)
    except Exception:
        raise NetworkError(
            f"{what} has sample inputs that are not plain tensors; torch.export.load would "
            "unpickle them with arbitrary code. Refused."
        ) from None
    if not isinstance(value, (tuple, dict)):
        raise NetworkError(f"{what} has malformed sample inputs; refused.")


def _walk(value: Any, key: str | None = None) -> Iterator[tuple[str | None, Any]]:
    yield key, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v, key)


def check_symbolic_expression(text: Any, what: str) -> None:
    """Refuse a symbolic size unless it is sympy's ``srepr`` of arithmetic over shape symbols.

    torch hands these strings to ``sympy.sympify``, which evaluates them as Python; see the
    comment at ``_SYMPY_NAMES`` for what is allowed.

    Raises:
        NetworkError: naming the first thing not allowed.
    """
    if not isinstance(text, str) or len(text) > _MAX_EXPR:
        raise NetworkError(f"{what} has a malformed or overlong symbolic size; refused.")

    def refuse(why: str) -> NetworkError:
        return NetworkError(
            f"{what} has a symbolic size {text[:60]!r} with {why}; torch would evaluate it as "
            "Python. Refused."
        )

    position, previous = 0, None
    end = len(text.rstrip())
    while position < end:
        match = _EXPR_TOKEN.match(text, position)
        if match is None:
            raise refuse(f"something other than arithmetic at {text[position : position + 12]!r}")
        name, quoted, op = match.group("name"), match.group("quoted"), match.group("op")
        if name is not None and not (
            _SYMBOL.match(name) or name in _SYMPY_NAMES or name in _SYMPY_KEYWORDS
        ):
            raise refuse(f"the name {name!r}, not a shape symbol or an allowed sympy function")
        if quoted is not None and not (_SYMBOL.match(quoted) or _QUOTED_NUMBER.match(quoted)):
            raise refuse(f"the string {quoted!r}")
        if op == "=" and (previous is None or previous.group("name") not in _SYMPY_KEYWORDS):
            raise refuse("an assignment")
        if op == "*" and previous is not None and previous.group("op") == "*":
            raise refuse("a power (**)")
        previous = match
        position = match.end()


def _check_model_json(data: bytes, what: str) -> None:
    if b"__enum__" in data:
        raise NetworkError(
            f"{what} has a pytree spec naming an enum, which torch would import by module name; "
            "refused."
        )
    document = _json(data, what, "graph description")
    if not isinstance(document, dict) or not isinstance(document.get("graph_module"), dict):
        raise NetworkError(f"{what} has a malformed graph description.")
    if document.get("guards_code"):
        raise NetworkError(
            f"{what} carries guard code (Python source that torch would run when the program is "
            "called); refused. Programs from torch.export.export carry none."
        )
    graph_module = document["graph_module"]
    graph = graph_module.get("graph")
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise NetworkError(f"{what} has a malformed graph.")
    if graph.get("custom_obj_values"):
        raise NetworkError(f"{what} holds custom (TorchScript) objects; refused.")
    for node in graph["nodes"]:
        target = node.get("target") if isinstance(node, dict) else None
        if not isinstance(target, str) or not (
            _ATEN_TARGET.match(target) or target in _INT_OPERATORS
        ):
            raise NetworkError(
                f"{what} calls {str(target)[:80]!r}, which is not an ATen operator; only "
                "networks made of PyTorch's own operators (no custom or higher-order operators, "
                "no control flow) are loaded."
            )
    for key in document.get("range_constraints") or {}:
        check_symbolic_expression(key, what)
    for key, value in _walk(document):
        if key == "expr_str":
            check_symbolic_expression(value, what)
    for key, value in _walk(document):
        if key in ("in_spec", "out_spec") and value is not None:
            _check_treespec(value, what)
    signature = graph_module.get("signature")
    for _, spec in _walk(signature):
        if isinstance(spec, dict):
            for name_key in ("parameter_name", "buffer_name", "tensor_constant_name"):
                if name_key in spec:
                    _check_fqn(spec[name_key], what)


def _check_treespec(text: Any, what: str) -> None:
    spec = _json(text.encode() if isinstance(text, str) else b"", what, "input/output spec")
    for key, value in _walk(spec):
        if key == "type" and value not in _TREESPEC_TYPES:
            raise NetworkError(
                f"{what} takes or returns a {str(value)[:60]!r}; only tensors in tuples, lists "
                "and dicts are loaded (torch would import other types by name). Refused."
            )


def _check_loaded_program(program: Any, what: str) -> None:
    """After loading: only placeholders, ATen calls and the allowed integer operators."""
    allowed_functions = set(_INT_OPERATORS.values())
    for node in program.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        target = node.target
        aten = isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"
        if node.op != "call_function" or not (aten or target in allowed_functions):
            raise NetworkError(f"{what} has a graph node {node.op} {target!r}; refused.")


def _load_export(spec: NetworkSpec, start: float) -> UserNetwork:
    path = spec.network
    shown = Path(path).name
    what = f"{shown} (a torch.export program)"
    data = read_weights_file(path, "network file")
    check_export_archive(data, shown)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as error:
        raise NetworkError(
            f"{what} could not be loaded by torch.export.load ({type(error).__name__}: "
            f"{_first_line(str(error))}). Was it saved by this version of PyTorch "
            f"({torch.__version__})?"
        ) from None
    _check_loaded_program(program, what)
    user_inputs = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    if len(user_inputs) != 1 or user_inputs[0] not in placeholders:
        raise NetworkError(
            f"{what} takes {len(user_inputs)} inputs; it must take one batch of images "
            "(N, 3, H, W)."
        )
    value = placeholders[user_inputs[0]].meta.get("val")
    shape = tuple(getattr(value, "shape", ()))
    if len(shape) != 4 or shape[1] != 3:
        raise NetworkError(f"{what} takes an input of shape {shape}; it must be (N, 3, H, W).")
    batch = int(shape[0]) if isinstance(shape[0], int) else None
    static = tuple(int(s) for s in shape[2:] if isinstance(s, int))
    if len(static) == 2:
        if spec.input_size is not None and (spec.input_size, spec.input_size) != static:
            raise NetworkError(
                f"{what} was exported for {static[0]}x{static[1]} inputs, but an input size of "
                f"{spec.input_size} was given; drop the option or re-export."
            )
        size, source = static, f"input size from the program's input shape {static[0]}x{static[1]}"
    else:
        size, source = (DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE), "default input size"
    # A static size agreeing with the option is the program's; say so once.
    given = dataclasses.replace(spec, input_size=None) if len(static) == 2 else spec
    preprocessing = _apply_options(given, size, IMAGENET_MEAN, IMAGENET_STD, source)
    if spec.mean is None and spec.std is None:
        preprocessing = dataclasses.replace(
            preprocessing, source=f"{preprocessing.source}; ImageNet mean and std (defaults)"
        )
    try:
        module = program.module()
    except Exception as error:
        raise NetworkError(
            f"{what} could not be turned into a module: {_first_line(str(error))}"
        ) from None
    features, weight, bias, head = _cut_at_head(module, what)
    network = UserNetwork(
        NetworkInfo(
            kind="torch.export",
            architecture="torch.export program",
            file=path,
            sha256=hashlib.sha256(data).hexdigest(),
            n_classes=int(weight.shape[0]),
            feature_dim=int(weight.shape[1]),
            head=head,
            parameters=sum(int(t.numel()) for t in program.state_dict.values()),
            preprocessing=preprocessing,
            batch_size=batch,
            load_seconds=0.0,
        ),
        features,
        weight,
        bias,
    )
    _check_head_is_output(network, program.module(), what)
    return _with_load_time(network, start)


def _cut_at_head(
    module: torch.fx.GraphModule, what: str
) -> tuple[torch.fx.GraphModule, torch.Tensor, torch.Tensor, str]:
    """Make ``module`` return the input of the final linear layer (in place).

    The graph's output must be an ``aten.linear`` (or ``aten.addmm`` of a transposed weight)
    whose weight and bias are the module's own tensors.

    Returns:
        The module, now returning features; the head's (C, d) weight and (C,) bias; its name.
    """
    aten = torch.ops.aten
    output = next(n for n in module.graph.nodes if n.op == "output")
    result = output.args[0]
    while isinstance(result, (tuple, list)) and len(result) == 1:
        result = result[0]
    if not isinstance(result, torch.fx.Node):
        raise NetworkError(f"{what} does not return one tensor of logits.")

    def tensor(node: Any) -> torch.Tensor | None:
        if isinstance(node, torch.fx.Node) and node.op == "get_attr":
            value = _get_attr(module, str(node.target))
            return value if isinstance(value, torch.Tensor) else None
        return None

    weight = bias = features = None
    if result.op == "call_function" and result.target == aten.linear.default:
        features = result.args[0]
        weight = tensor(result.args[1])
        bias_node = result.args[2] if len(result.args) > 2 else result.kwargs.get("bias")
        bias = None if bias_node is None else tensor(bias_node)
        if bias_node is not None and bias is None:
            weight = None
    elif result.op == "call_function" and result.target == aten.addmm.default:
        bias_node, features, transposed = result.args[:3]
        if (
            isinstance(transposed, torch.fx.Node)
            and transposed.target in (aten.t.default, aten.permute.default)
            and (transposed.target == aten.t.default or list(transposed.args[1]) == [1, 0])
        ):
            weight = tensor(transposed.args[0])
            bias = tensor(bias_node)
            weight = weight if bias is not None else None
    if weight is None or not isinstance(features, torch.fx.Node):
        found = result.target if result.op == "call_function" else result.op
        raise NetworkError(
            f"{what}: its output is produced by {found}, not by a final linear layer with fixed "
            "weights, so there is no last layer to refit. Export the network that ends in its "
            "classification layer (no softmax after it)."
        )
    if weight.ndim != 2 or (bias is not None and bias.shape != (weight.shape[0],)):
        raise NetworkError(f"{what}: its final linear layer has an unexpected shape.")
    head = f"graph node '{result.name}' ({result.target})"
    output.args = ((features,),) if isinstance(output.args[0], (tuple, list)) else (features,)
    module.graph.eliminate_dead_code()
    module.graph.lint()
    module.recompile()
    module.requires_grad_(False)
    weight = weight.detach().float()
    bias = torch.zeros(weight.shape[0]) if bias is None else bias.detach().float()
    return module, weight, bias, head


def _get_attr(module: torch.nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


# ------------------------------------------------------------------------------- uploads
@dataclass(frozen=True)
class StoredNetwork:
    """An uploaded network file in the store, checked by loading it.

    Attributes:
        content_hash: sha256 of the file (the store's key).
        spec: what to put in ``ExplainerConfig(network=...)``.
        info: what was loaded (classes, feature size, preprocessing).
        filename: the name it was uploaded under.
    """

    content_hash: str
    spec: NetworkSpec
    info: NetworkInfo
    filename: str


class NetworkUploads:
    """Uploaded network files under ``<store root>/networks/``: ``<sha256>.pt`` (a state dict,
    with its architecture in ``<sha256>.json``) or ``<sha256>.pt2`` (a torch.export program).

    A file is written to a temporary name, loaded and checked exactly as the command line does
    (:func:`load_network`), and only then renamed into place; a refused file leaves nothing.

    Args:
        store: the artifact store whose directory holds them (default: the user cache).
    """

    def __init__(self, store: Any | None = None) -> None:
        from core.store import ArtifactStore

        self.store = store if store is not None else ArtifactStore()
        self.root = Path(self.store.root) / "networks"

    def add(
        self,
        data: bytes,
        *,
        filename: str,
        architecture: str | None = None,
        input_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
    ) -> StoredNetwork:
        """Check and store an uploaded weights file (state dict with ``architecture``) or a
        ``.pt2`` program (``filename`` ending in .pt2, no architecture).

        Raises:
            NetworkError: too large, or refused by :func:`load_network` (the message says why).
        """
        if len(data) > MAX_WEIGHTS_BYTES:
            raise NetworkError(
                f"{filename} is larger than the {MAX_WEIGHTS_BYTES // 2**20} MB limit for "
                "network files."
            )
        export = filename.lower().endswith(_EXPORT_SUFFIX)
        if export and architecture:
            raise NetworkError(f"{filename} is a torch.export program; give no architecture.")
        if not export and not architecture:
            raise NetworkError(
                f"{filename} is a state dict: say which torchvision architecture it belongs to "
                "(e.g. resnet18), or upload a torch.export program (.pt2)."
            )
        content_hash = hashlib.sha256(data).hexdigest()
        suffix = _EXPORT_SUFFIX if export else ".pt"
        final = self.root / f"{content_hash}{suffix}"
        options = {"input_size": input_size, "mean": mean, "std": std}
        incoming = self.root / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=incoming, suffix=suffix)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            checked = NetworkSpec(
                temporary if export else str(architecture),
                weights=None if export else temporary,
                **options,  # type: ignore[arg-type]
            )
            load_network(checked)  # refuses anything the command line would refuse
            sidecar = {"architecture": architecture, "filename": filename, **options}
            self._write_json(self.root / f"{content_hash}.json", sidecar)
            os.replace(temporary, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        return self.get(content_hash)

    def get(self, content_hash: str) -> StoredNetwork:
        """A stored network by the sha256 of its file. Raises NetworkError if there is none."""
        if not re.fullmatch(r"[0-9a-f]{64}", str(content_hash)):
            raise NetworkError(f"{content_hash!r} is not a network file's sha256.")
        try:
            sidecar = json.loads((self.root / f"{content_hash}.json").read_text())
        except (OSError, ValueError):
            raise NetworkError(f"No uploaded network {content_hash[:12]} in the store.") from None
        architecture = sidecar.get("architecture")
        path = self.root / f"{content_hash}{'.pt' if architecture else _EXPORT_SUFFIX}"
        if not path.is_file():
            raise NetworkError(f"No uploaded network {content_hash[:12]} in the store.")
        mean, std = sidecar.get("mean"), sidecar.get("std")
        spec = NetworkSpec(
            architecture or str(path),
            weights=str(path) if architecture else None,
            input_size=sidecar.get("input_size"),
            mean=tuple(mean) if mean else None,  # type: ignore[arg-type]
            std=tuple(std) if std else None,  # type: ignore[arg-type]
        )
        return StoredNetwork(content_hash, spec, load_network(spec).info, str(sidecar["filename"]))

    def list(self) -> list[str]:
        """Content hashes of the stored networks."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.stem
            for p in self.root.glob("*.json")
            if re.fullmatch(r"[0-9a-f]{64}", p.stem)
            and any((self.root / f"{p.stem}{s}").is_file() for s in (".pt", _EXPORT_SUFFIX))
        )

    def delete(self, content_hash: str) -> bool:
        """Remove a stored network. Returns whether it existed."""
        if not re.fullmatch(r"[0-9a-f]{64}", str(content_hash)):
            raise NetworkError(f"{content_hash!r} is not a network file's sha256.")
        existed = False
        for suffix in (".pt", _EXPORT_SUFFIX, ".json"):
            with contextlib.suppress(FileNotFoundError):
                (self.root / f"{content_hash}{suffix}").unlink()
                existed = True
        return existed

    @staticmethod
    def _write_json(path: Path, value: Any) -> None:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
        try:
            with os.fdopen(descriptor, "w") as handle:
                json.dump(value, handle)
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
