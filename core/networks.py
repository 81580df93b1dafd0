"""The fragility study's networks, their training objective as a ``TwiceDifferentiable``, and
batched SGD that trains many copies at once (for leave-one-out retraining).

Three families (:class:`Architecture`): the small CNNs of the depth and width series, LeNet-5 and
a residual network without normalisation layers (``ResNet-8``). Every network is a ``body`` (to
the last features) and a linear ``head``, which is what the last-layer scope of
:class:`NetworkObjective` differentiates.

The objective is the convex models' convention (docs/architecture.md):

    R(θ) = (1/n) Σ_i w_i ℓ(f(x_i; θ), y_i) + (λ/2)‖θ‖²,

with ℓ the binary logistic loss (one output) or softmax cross-entropy from :mod:`core.losses`,
weight decay on every parameter (biases included) and sample weights w_i = 1 for an ordinary
fit; removing a point sets its weight to 0 and keeps the 1/n and λ.

Networks are trained in float32 (speed; the ground-truth differences are far above float32
resolution). Influence quantities are computed from a copy of θ̂ in float64 by default, or in
float32 for networks too large for float64 convolutions on a CPU (``dtype``), and are returned
in float64 either way. All derivatives go through ``torch.func`` (``functional_call``, ``grad``,
``vmap``, ``jvp``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from core.errors import InfluenceExplorerError
from core.losses import LogisticLoss, Loss, SoftmaxCrossEntropy
from core.models import DTYPE, as_float64, as_labels

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
}

#: Network families: the small CNNs of the depth/width series, LeNet-5, a residual network.
FAMILIES: tuple[str, ...] = ("cnn", "lenet", "resnet")

#: Conv layers that halve the resolution (stride 2); later layers keep it. Two halvings take a
#: 14x14 input to 4x4, where further 3x3 layers still see real neighbourhoods.
STRIDED_LAYERS = 2


@dataclass(frozen=True)
class Architecture:
    """A network of the study.

    Attributes:
        depth: layers with weights. "cnn": 3x3 conv layers (1-12; the first two have stride 2).
            "lenet": 5 (two 5x5 convs, three linear layers). "resnet": 6k + 2 (a 3x3 stem, three
            stages of k two-conv residual blocks, the linear head): 8, 14, 20, ...
        width: "cnn": channels of every conv layer. "lenet": channels of the first conv (6 in
            LeNet-5; the second has 16/6 as many). "resnet": channels of the first stage (the
            stages have width, 2·width, 4·width).
        activation: "tanh" (smooth, so the Hessian is the Hessian everywhere), "relu" or
            "softplus".
        family: "cnn", "lenet" or "resnet". :meth:`lenet5` and :meth:`resnet` build the latter
            two with their usual activation.
    """

    depth: int = 2
    width: int = 8
    activation: str = "tanh"
    family: str = "cnn"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise InfluenceExplorerError(
                f"family must be one of {', '.join(FAMILIES)}; got {self.family!r}."
            )
        if not isinstance(self.depth, int) or isinstance(self.depth, bool):
            raise InfluenceExplorerError(f"depth must be an integer; got {self.depth!r}.")
        if self.family == "cnn" and not 1 <= self.depth <= 12:
            raise InfluenceExplorerError(f"depth must be an integer in 1..12; got {self.depth!r}.")
        if self.family == "lenet" and self.depth != 5:
            raise InfluenceExplorerError(f"a LeNet has depth 5; got {self.depth!r}.")
        if self.family == "resnet" and not (8 <= self.depth <= 56 and (self.depth - 2) % 6 == 0):
            raise InfluenceExplorerError(
                f"a ResNet's depth must be 6k + 2 (8, 14, ..., 56); got {self.depth!r}."
            )
        if not (isinstance(self.width, int) and 1 <= self.width <= 256):
            raise InfluenceExplorerError(f"width must be an integer in 1..256; got {self.width!r}.")
        if self.activation not in ACTIVATIONS:
            raise InfluenceExplorerError(
                f"activation must be one of {', '.join(ACTIVATIONS)}; got {self.activation!r}."
            )

    @classmethod
    def lenet5(cls, width: int = 6, activation: str = "tanh") -> Architecture:
        """LeNet-5 (LeCun et al. 1998: tanh, average-pooling subsampling)."""
        return cls(5, width, activation, "lenet")

    @classmethod
    def resnet(cls, depth: int = 8, width: int = 8, activation: str = "relu") -> Architecture:
        """A ResNet of ``depth`` layers without normalisation (see :class:`ResNet`)."""
        return cls(depth, width, activation, "resnet")

    @property
    def label(self) -> str:
        """Short display name, e.g. "CNN d2 w8", "LeNet-5", "ResNet-8 w8"."""
        usual = {"cnn": "tanh", "lenet": "tanh", "resnet": "relu"}[self.family]
        suffix = "" if self.activation == usual else f" {self.activation}"
        if self.family == "lenet":
            return f"LeNet-5{'' if self.width == 6 else f' w{self.width}'}{suffix}"
        if self.family == "resnet":
            return f"ResNet-{self.depth} w{self.width}{suffix}"
        return f"CNN d{self.depth} w{self.width}{suffix}"


class SmallCNN(nn.Module):
    """``depth`` 3x3 conv layers of ``width`` channels (stride 2 for the first two), then a linear
    head on the flattened feature map.

    Args:
        architecture: depth, width, activation.
        image_shape: (H, W, C) of the inputs.
        n_outputs: 1 for binary logistic loss, else the number of classes.
    """

    def __init__(
        self, architecture: Architecture, image_shape: tuple[int, int, int], n_outputs: int
    ) -> None:
        super().__init__()
        h, w, channels = image_shape
        layers: list[nn.Module] = []
        for i in range(architecture.depth):
            stride = 2 if i < STRIDED_LAYERS else 1
            layers.append(nn.Conv2d(channels, architecture.width, 3, stride=stride, padding=1))
            layers.append(ACTIVATIONS[architecture.activation]())
            channels = architecture.width
            if stride == 2:
                h, w = (h + 1) // 2, (w + 1) // 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(channels * h * w, n_outputs)
        self.architecture = architecture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores for images (m, C, H, W). Returns: (m, n_outputs)."""
        return self.head(self.body(x))


class LeNet5(nn.Module):
    """LeNet-5: 5x5 conv (6 channels, padded), 2x2 average pooling, 5x5 conv (16 channels),
    2x2 average pooling, linear layers of 120 and 84 units, the linear head; tanh throughout.

    On 28x28 inputs this is LeCun et al.'s network. On smaller inputs the second pooling is left
    out once the map it would pool is smaller than 10x10 (on 14x14: the second conv gives 3x3,
    pooled no further), so the layers and their widths stay those of LeNet-5.

    Args:
        architecture: a "lenet" architecture (width: channels of the first conv).
        image_shape: (H, W, C) of the inputs, at least 12x12.
        n_outputs: 1 for binary logistic loss, else the number of classes.
    """

    def __init__(
        self, architecture: Architecture, image_shape: tuple[int, int, int], n_outputs: int
    ) -> None:
        super().__init__()
        h, w, channels = image_shape
        if min(h, w) < 12:
            raise InfluenceExplorerError(f"LeNet-5 needs images of at least 12x12; got {h}x{w}.")
        act = ACTIVATIONS[architecture.activation]
        c1, c2 = architecture.width, max(1, round(architecture.width * 16 / 6))
        h, w = h // 2 - 4, w // 2 - 4  # pool, then a 5x5 valid conv
        second_pool = min(h, w) >= 10
        if second_pool:
            h, w = h // 2, w // 2
        self.body = nn.Sequential(
            nn.Conv2d(channels, c1, 5, padding=2),
            act(),
            nn.AvgPool2d(2),
            nn.Conv2d(c1, c2, 5),
            act(),
            *([nn.AvgPool2d(2)] if second_pool else []),
            nn.Flatten(),
            nn.Linear(c2 * h * w, 120),
            act(),
            nn.Linear(120, 84),
            act(),
        )
        self.head = nn.Linear(84, n_outputs)
        self.architecture = architecture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores for images (m, C, H, W). Returns: (m, n_outputs)."""
        return self.head(self.body(x))


class ResidualBlock(nn.Module):
    """x -> act(shortcut(x) + conv(act(conv(x)))), without normalisation.

    The shortcut is the identity, or where the block halves the resolution and widens, a
    parameter-free subsampling with zero channels appended (He et al.'s option A). The branch's
    last conv starts at zero (as in Fixup and SkipInit), so each block starts as the identity and
    the network trains without BatchNorm.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.act = ACTIVATIONS[activation]()
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv2(self.act(self.conv1(x)))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.extra_channels:
            shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return self.act(shortcut + branch)


class ResNet(nn.Module):
    """A CIFAR-style ResNet (He et al. 2016) of depth 6k + 2 without BatchNorm: a 3x3 stem of
    ``width`` channels, three stages of k residual blocks (width, 2·width, 4·width channels; the
    second and third start with stride 2), global average pooling, the linear head.

    BatchNorm is left out on purpose: it couples the examples of a minibatch, so a per-example
    gradient and "the objective without point j" would depend on which other points share its
    batch; with fixed per-layer computations both are defined.

    Args:
        architecture: a "resnet" architecture.
        image_shape: (H, W, C) of the inputs.
        n_outputs: 1 for binary logistic loss, else the number of classes.
    """

    def __init__(
        self, architecture: Architecture, image_shape: tuple[int, int, int], n_outputs: int
    ) -> None:
        super().__init__()
        _, _, channels = image_shape
        width, blocks = architecture.width, (architecture.depth - 2) // 6
        layers: list[nn.Module] = [
            nn.Conv2d(channels, width, 3, padding=1),
            ACTIVATIONS[architecture.activation](),
        ]
        current = width
        for stage, out in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(ResidualBlock(current, out, stride, architecture.activation))
                current = out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(current, n_outputs)
        self.architecture = architecture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores for images (m, C, H, W). Returns: (m, n_outputs)."""
        return self.head(self.body(x))


#: A network of the study: a ``body`` to the last features and a linear ``head``.
Network = SmallCNN | LeNet5 | ResNet
_NETWORKS: dict[str, type[SmallCNN] | type[LeNet5] | type[ResNet]] = {
    "cnn": SmallCNN,
    "lenet": LeNet5,
    "resnet": ResNet,
}


def make_loss(n_classes: int) -> Loss:
    """The loss of a classifier with ``n_classes`` classes (the convex models' choice)."""
    return LogisticLoss() if n_classes == 2 else SoftmaxCrossEntropy()


def build_network(
    architecture: Architecture, image_shape: tuple[int, int, int], n_classes: int, seed: int
) -> Network:
    """A freshly initialised float32 network of the architecture's family (PyTorch's default
    init, seeded; head bias 0)."""
    n_outputs = make_loss(n_classes).n_outputs(n_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = _NETWORKS[architecture.family](architecture, image_shape, n_outputs)
    with torch.no_grad():
        network.head.bias.zero_()
    return network


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run a block with ``threads`` torch intra-op threads (None: leave the setting alone).

    These networks are small: each op is tiny and OpenMP threads mostly wait for each other,
    so one thread is several times faster than two on a busy machine.
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise InfluenceExplorerError(f"threads must be >= 1 or None; got {threads!r}.")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------- flat parameters
class ParameterLayout:
    """Maps between a module's named parameters and one flat vector θ (``named_parameters``
    order)."""

    def __init__(self, network: nn.Module) -> None:
        shapes = {name: tuple(p.shape) for name, p in network.named_parameters()}
        self.names = tuple(shapes)
        self.shapes = tuple(shapes.values())
        self.sizes = tuple(math.prod(s) for s in self.shapes)

    @property
    def n_params(self) -> int:
        return sum(self.sizes)

    def flatten(self, network: nn.Module, dtype: torch.dtype = DTYPE) -> torch.Tensor:
        """θ of the network's current parameters. Returns: (p,)."""
        params = dict(network.named_parameters())
        return torch.cat([params[n].detach().reshape(-1).to(dtype) for n in self.names])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views of a flat θ (p,), for ``functional_call``."""
        chunks = torch.split(theta, self.sizes)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def load_into(self, network: nn.Module, theta: torch.Tensor) -> None:
        """Copy a flat θ into the network's parameters (in place)."""
        params = dict(network.named_parameters())
        with torch.no_grad():
            for name, value in self.unflatten(theta).items():
                params[name].copy_(value.to(params[name].dtype))


def images_to_tensor(images: np.ndarray, image_size: int | None = None) -> torch.Tensor:
    """uint8 images (N, H, W, C) to float32 (N, C, H', W') in [-1, 1].

    ``image_size`` (a divisor of H and W) average-pools to that side length first; the exact
    Hessian's cost grows with the pixels each conv layer touches, so the study runs on 14x14.
    """
    x = torch.tensor(np.asarray(images), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    if image_size is not None and image_size != x.shape[-1]:
        h, w = x.shape[-2:]
        if h % image_size or w % image_size:
            raise InfluenceExplorerError(
                f"image_size {image_size} must divide the images' side lengths ({h}x{w})."
            )
        x = nn.functional.avg_pool2d(x, (h // image_size, w // image_size))
    return x * 2.0 - 1.0


# ---------------------------------------------------------------------------- objective
class NetworkObjective:
    """The training objective of a trained network at θ̂, as the solvers' ``TwiceDifferentiable``.

    R(θ) = (1/n) Σ_i ℓ(f(x_i; θ), y_i) + (λ/2)‖θ‖² over all parameters (``scope="all"``) or only
    the linear head's (``scope="last"``: the head's block of ∇²R with the rest of the network held
    at θ̂; that objective is a logistic regression on the network's last features, so its Hessian
    is positive semi-definite plus λ).

    Every quantity is returned in float64. ``dtype`` is the precision the network is evaluated
    and differentiated in: float64 (default) or float32 for networks whose float64 convolutions
    are too slow on a CPU (no vectorised float64 kernel: 3x slower measured). With float32 the
    products carry a relative rounding error of about 1e-6, so iterative solvers should not be
    asked for residuals below about 1e-5.

    Args:
        network: the trained network (not modified; a copy in ``dtype`` is made).
        X: (n, C, H, W) training images as the network sees them.
        y: (n,) integer labels.
        l2: weight decay λ the network was trained with.
        scope: "all" or "last".
        n_classes: classes of the problem (default: from the labels, at least 2).
        dtype: torch.float64 or torch.float32.
    """

    SCOPES = ("all", "last")
    #: Activations (floats) one vmapped chunk of Hessian-vector products may hold.
    ACTIVATION_BUDGET = 32_000_000

    def __init__(
        self,
        network: Network,
        X: Any,
        y: Any,
        l2: float,
        *,
        scope: str = "all",
        n_classes: int | None = None,
        dtype: torch.dtype = DTYPE,
    ) -> None:
        if scope not in self.SCOPES:
            raise InfluenceExplorerError(f"scope must be 'all' or 'last'; got {scope!r}.")
        if not (math.isfinite(l2) and l2 >= 0):
            raise InfluenceExplorerError(f"l2 must be a finite number >= 0; got {l2!r}.")
        if dtype not in (torch.float32, torch.float64):
            raise InfluenceExplorerError(
                f"dtype must be torch.float32 or torch.float64; got {dtype!r}."
            )
        self.l2 = float(l2)
        self.scope = scope
        self.dtype = dtype
        self.labels = as_labels(y)
        self.n_classes = n_classes if n_classes is not None else max(int(self.labels.max()) + 1, 2)
        self.loss = make_loss(self.n_classes)
        self.network = _copy_in(network, dtype)
        inputs = as_float64(X).to(dtype)
        if scope == "all":
            self.module: nn.Module = self.network
            self.inputs = inputs
        else:
            # The head's objective only needs the body's (fixed) features: computed once.
            self.module = self.network.head
            with torch.no_grad():
                self.inputs = self.network.body(inputs)
        self.layout = ParameterLayout(self.module)
        self._theta = self.layout.flatten(self.module, dtype)
        #: θ̂ over the scope's parameters, float64. (p,)
        self.theta_ = self._theta.to(DTYPE)
        self._activations = _activation_size(self.module, self.inputs[:1])
        self._grad_of_mean = grad(self._mean_loss)
        self._hessian: torch.Tensor | None = None
        self._training_gradients: torch.Tensor | None = None

    # ------------------------------------------------------------------ protocol
    @property
    def n_train_(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def n_params_(self) -> int:
        return int(self.theta_.shape[0])

    def features(self, X: Any) -> torch.Tensor:
        """What :attr:`module` sees for images X (in ``dtype``): the images, or the body's
        features for "last"."""
        inputs = as_float64(X).to(self.dtype)
        if self.scope == "all":
            return inputs
        with torch.no_grad():
            return self.network.body(inputs)

    def _scores(self, theta: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.layout.unflatten(theta), (inputs,))

    def _losses(
        self, theta: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return self.loss.value(self._scores(theta, inputs), labels)

    def _mean_loss(
        self, theta: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return self._losses(theta, inputs, labels).mean()

    def _data_hvp(
        self, v: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """(1/m) Σ ∇²ℓ_i v over the given examples, forward-over-reverse, one column."""

        def g(theta: torch.Tensor) -> torch.Tensor:
            return self._grad_of_mean(theta, inputs, labels)

        return jvp(g, (self._theta,), (v,))[1]

    def _chunk(self, n_examples: int) -> int:
        # vmap over k columns holds k copies of every activation: bound columns × activations.
        per_column = max(n_examples, 1) * max(self._activations, 1)
        return max(1, min(64, self.ACTIVATION_BUDGET // per_column))

    def hvp(self, vectors: Any, indices: Any | None = None) -> torch.Tensor:
        """Hessian-vector products ∇²R(θ̂) v.

        Args:
            vectors: (p,) or (p, k).
            indices: optional training indices; then the data term is their mean
                (1/b) Σ_{i∈batch} ∇²ℓ_i v (unbiased under uniform sampling, what LiSSA uses).
                λ v is always added exactly.
        Returns:
            Same shape as ``vectors``, float64.
        """
        v = as_float64(vectors)
        squeeze = v.ndim == 1
        columns = v[:, None] if squeeze else v
        if columns.shape[0] != self.n_params_:
            raise InfluenceExplorerError(
                f"vectors must have {self.n_params_} rows; got {tuple(v.shape)}."
            )
        inputs, labels = self.inputs, self.labels
        if indices is not None:
            idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
            inputs, labels = inputs[idx], labels[idx]
        batched = vmap(lambda u: self._data_hvp(u, inputs, labels))
        chunk = self._chunk(inputs.shape[0])
        pieces = [batched(c.to(self.dtype)) for c in torch.split(columns.T, chunk)]
        out = torch.cat(pieces).T.to(DTYPE) + self.l2 * columns
        return out[:, 0] if squeeze else out

    def hessian(self) -> torch.Tensor:
        """Exact ∇²R(θ̂). Returns: (p, p) float64, a fresh copy (the exact solver adds its damping
        in place).

        Computed once (:meth:`cache_hessian`) and kept: p Hessian-vector products over the
        whole training set.
        """
        if self._hessian is None:
            self.cache_hessian()
        assert self._hessian is not None
        return self._hessian.clone()

    def cache_hessian(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Compute the dense Hessian now (with a progress callback) and keep it."""
        if self._hessian is None:
            self._hessian = self._dense_hessian(progress)

    def _dense_hessian(self, progress: Callable[[int, int], None] | None) -> torch.Tensor:
        # Columns H e_k from batched HVPs; symmetrised to remove the last bits of rounding.
        p = self.n_params_
        eye = torch.eye(p, dtype=self.dtype)
        chunk = self._chunk(self.n_train_)
        batched = vmap(lambda u: self._data_hvp(u, self.inputs, self.labels))
        columns = []
        for start in range(0, p, chunk):
            columns.append(batched(eye[start : start + chunk]).to(DTYPE))
            if progress is not None:
                progress(min(start + chunk, p), p)
        hessian = torch.cat(columns)
        hessian = 0.5 * (hessian + hessian.T)
        hessian.diagonal().add_(self.l2)
        return hessian

    # ------------------------------------------------------------------ quantities
    def _at(self, theta: Any | None) -> torch.Tensor:
        return self._theta if theta is None else as_float64(theta).to(self.dtype)

    def objective(self, theta: Any | None = None) -> float:
        """R(θ) (at θ̂ by default)."""
        th = self._at(theta)
        value = self._mean_loss(th, self.inputs, self.labels)
        return float(value) + 0.5 * self.l2 * float(th.to(DTYPE) @ th.to(DTYPE))

    def objective_gradient(self, theta: Any | None = None) -> torch.Tensor:
        """∇R(θ) (at θ̂ by default). Returns: (p,) float64."""
        th = self._at(theta)
        return (self._grad_of_mean(th, self.inputs, self.labels) + self.l2 * th).to(DTYPE)

    def per_example_losses(self, X: Any, y: Any) -> torch.Tensor:
        """ℓ(z, θ̂) for images X (m, C, H, W). Returns: (m,) float64."""
        with torch.no_grad():
            return self._losses(self._theta, self.features(X), as_labels(y)).to(DTYPE)

    def per_example_gradients(self, X: Any, y: Any, chunk: int = 256) -> torch.Tensor:
        """∇_θ ℓ(z, θ̂) for each example (over the objective's scope). Returns: (m, p) float64."""
        return self._module_gradients(self.features(X), as_labels(y), chunk)

    def loss_gradients(self, inputs: Any, labels: Any) -> torch.Tensor:
        """The engine's name for :meth:`per_example_gradients` (images in). Returns: (m, p)."""
        return self.per_example_gradients(inputs, labels)

    def training_gradients(self) -> torch.Tensor:
        """∇_θ ℓ(z_j, θ̂) for every training point, computed once and kept. Returns: (n, p)."""
        if self._training_gradients is None:
            self._training_gradients = self._module_gradients(self.inputs, self.labels)
        return self._training_gradients

    def training_gradient_products(self, vectors: torch.Tensor) -> torch.Tensor:
        """∇ℓ(z_j, θ̂)ᵀ v for (p, k) vectors and every training point. Returns: (k, n)."""
        v = as_float64(vectors)
        v = v[:, None] if v.ndim == 1 else v
        return (self.training_gradients() @ v).T

    def _module_gradients(
        self, inputs: torch.Tensor, labels: torch.Tensor, chunk: int = 256
    ) -> torch.Tensor:
        """Per-example gradients for inputs already in :attr:`module`'s space. Returns: (m, p)."""

        def single(theta: torch.Tensor, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            return self._losses(theta, x[None], label[None])[0]

        per_example = vmap(grad(single), in_dims=(None, 0, 0))
        return torch.cat(
            [
                per_example(self._theta, inputs[s : s + chunk], labels[s : s + chunk]).to(DTYPE)
                for s in range(0, inputs.shape[0], chunk)
            ]
        )


def _activation_size(module: nn.Module, example: torch.Tensor) -> int:
    """Floats every leaf module outputs for one example (what a vmapped column holds)."""
    total = 0

    def count(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    return total


def _copy_in(network: Network, dtype: torch.dtype) -> Network:
    return copy.deepcopy(network).to(dtype)


# ---------------------------------------------------------------------------- training
#: Activations (floats) one vmapped group of trained copies may hold at once.
TRAINING_ACTIVATION_BUDGET = 40_000_000


@dataclass(frozen=True)
class SGDSchedule:
    """Minibatch SGD with heavy-ball momentum and a cosine learning rate.

    lr_t = lr · (1 + cos(π t / T)) / 2 over T = epochs · ceil(n / batch_size) steps, so the run
    anneals to a (near) stationary point.
    """

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float

    def total_steps(self, n: int) -> int:
        return self.epochs * math.ceil(n / self.batch_size)

    def learning_rate_at(self, step: int, n: int) -> float:
        total = self.total_steps(n)
        return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * step / total))


def train_sgd(
    network: Network,
    theta0: torch.Tensor,
    X: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    l2: float,
    schedule: SGDSchedule,
    *,
    seed: int = 0,
    n_classes: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Train m copies of the network at once (vmapped), each with its own sample weights.

    Every copy sees the same minibatch sequence (shuffled per epoch from ``seed``), so copies that
    differ in one sample weight differ only through that point: common random numbers for
    leave-one-out retraining. The minibatch gradient is (1/b) Σ_{i∈batch} w_i ∇ℓ_i + λθ, an
    unbiased estimate of ∇R with the removed points' terms dropped and 1/n kept.

    Args:
        network: defines the function (its parameter values are not used).
        theta0: (m, p) float32 starting parameters.
        X: (n, C, H, W) float32 images; y: (n,) labels.
        weights: (m, n) sample weights.
        l2: weight decay λ.
        schedule: optimiser and learning-rate schedule.
        seed: minibatch order.
        progress: called as progress(epoch_done, epochs_total).
    Returns:
        (m, p) float32 parameters after the run.
    """
    layout = ParameterLayout(network)
    loss = make_loss(n_classes)
    n = X.shape[0]
    b = schedule.batch_size
    if theta0.ndim != 2 or theta0.shape[1] != layout.n_params:
        raise InfluenceExplorerError(
            f"theta0 must be (m, {layout.n_params}); got {tuple(theta0.shape)}."
        )
    if weights.shape != (theta0.shape[0], n):
        raise InfluenceExplorerError(
            f"weights must be (m, n) = ({theta0.shape[0]}, {n}); got {tuple(weights.shape)}."
        )

    def minibatch_objective(theta, xb, yb, wb):
        scores = functional_call(network, layout.unflatten(theta), (xb,))
        return (wb * loss.value(scores, yb)).mean() + 0.5 * l2 * (theta * theta).sum()

    step_gradient = vmap(grad(minibatch_objective), in_dims=(0, None, None, 0))
    # Copies are independent: vmap them in groups whose activations fit the budget.
    per_copy = max(1, _activation_size(network, X[:1].to(torch.float32)) * min(b, n))
    group = max(1, TRAINING_ACTIVATION_BUDGET // per_copy)
    theta = theta0.clone()
    velocity = torch.zeros_like(theta)
    generator = torch.Generator().manual_seed(seed)
    epochs = schedule.epochs
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, b):
            batch = order[start : start + b]
            xb, yb, wb = X[batch], y[batch], weights[:, batch]
            g = torch.cat(
                [
                    step_gradient(theta[i : i + group], xb, yb, wb[i : i + group])
                    for i in range(0, theta.shape[0], group)
                ]
            )
            velocity.mul_(schedule.momentum).add_(g)
            theta.sub_(schedule.learning_rate_at(step, n) * velocity)
            step += 1
        if progress is not None:
            progress(epoch + 1, epochs)
    if not torch.isfinite(theta).all():
        raise InfluenceExplorerError(
            "Training diverged (non-finite parameters); lower the learning rate."
        )
    return theta
