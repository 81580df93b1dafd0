"""What the sidebar decides: :class:`Settings`, and the datasets and backbones it offers.

Settings are frozen and made of primitives, so they key the shared caches themselves: equal
settings hash alike in Streamlit (which hashes a dataclass by its fields), and nothing is keyed by
a hand-made tuple that could fall out of step with them. :attr:`Settings.engine` is the part that
identifies a fitted explainer; k and the estimate only change what is asked of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from core.archive import DatasetUploads
from core.data import DEBIAN_FASHION_MNIST_DIR, Dataset, open_dataset, resolve_under_roots
from core.errors import InfluenceExplorerError
from core.explainer import ExplainerConfig, default_classes
from core.features import DEFAULT_BACKBONE, available_backbones
from core.files import printable
from core.influence import ESTIMATES, SolverConfig
from core.labels import ESTIMATE_LABELS, SOLVER_LABELS
from core.user_network import NetworkSpec, NetworkUploads

#: Directories the server allows datasets to be read from, separated by os.pathsep.
DATA_ROOTS_ENV = "INFLUENCE_DATA_ROOTS"

DEMO_SPEC = "demo"
FASHION_MNIST_SPEC = "fashion-mnist"
#: A dataset uploaded on the "Your data" page is the spec "upload:<its content hash>".
UPLOAD_PREFIX = "upload:"

#: What to expect from the iterative solvers on these small models (measured on the demo pair).
SOLVER_CAUTIONS = {
    "cg": "CG solves once per training image while preparing: about a minute or more here, "
    "against seconds for the exact solver, for the same scores to within its tolerance.",
    "lissa": "LiSSA takes minutes to prepare here, and at its default depth it does not converge "
    "on these Hessians unless the damping is large (each page then says how deep it would need "
    "to go), so its scores differ from the exact ones. Use it to see that effect, not for "
    "answers.",
}
#: A fixed menu of damping values keeps the number of distinct shared engines small.
DAMPING_CHOICES: tuple[float, ...] = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
IMAGE_SIZE_CHOICES: tuple[int, ...] = (28, 32, 48, 64, 96)
DEFAULT_MAX_TRAIN_PER_CLASS = 1000
#: Largest per-class cap the sidebar (and a link) accepts.
MAX_TRAIN_PER_CLASS = 60_000
#: The class choice's option (and a link's value) for every class; a link's ``max_train`` too.
ALL_OPTION = "all"

# Session-state key owned by this module.
_SETTINGS = "state_settings"

__all__ = [
    "ALL_OPTION",
    "DAMPING_CHOICES",
    "DATA_ROOTS_ENV",
    "DEFAULT_BACKBONE",
    "DEMO_SPEC",
    "ESTIMATES",
    "ESTIMATE_LABELS",
    "FASHION_MNIST_SPEC",
    "IMAGE_SIZE_CHOICES",
    "MAX_TRAIN_PER_CLASS",
    "SOLVER_CAUTIONS",
    "SOLVER_LABELS",
    "UPLOAD_PREFIX",
    "BackboneChoice",
    "Dataset",
    "DatasetChoice",
    "EngineSpec",
    "Settings",
    "backbone_choices",
    "class_names",
    "current_settings",
    "data_roots",
    "dataset_choices",
    "dataset_is_directory",
    "default_pair",
    "forget_loaded_datasets",
    "largest_class",
    "load_dataset",
    "store_settings",
    "uploaded_dataset_hash",
    "uploaded_network_spec",
]


@dataclass(frozen=True)
class DatasetChoice:
    """A dataset the sidebar offers: the spec given to core and a label for people."""

    spec: str
    label: str


@dataclass(frozen=True)
class BackboneChoice:
    """An ImageNet backbone the sidebar offers, and whether it can be used on this server."""

    name: str
    label: str
    available: bool
    reason: str


@dataclass(frozen=True)
class EngineSpec:
    """What identifies a fitted explainer: the dataset it reads and the engine's configuration.

    Frozen and hashable: it keys the shared engines and every result computed from an engine
    alone (heatmaps, experiments), in ``st.cache_*`` and in session state.

    Attributes:
        dataset: "demo", "fashion-mnist", a directory under the data roots, or
            "upload:<content hash>" (a dataset uploaded on the "Your data" page).
        image_size: side in pixels directory datasets are read at (ignored by the others).
        config: core's frozen configuration of the explainer built on it (with the uploaded
            network, if any, as ``config.network``).
    """

    dataset: str
    image_size: int
    config: ExplainerConfig


@dataclass(frozen=True)
class Settings:
    """Everything the sidebar decides. Frozen and made of primitives, so it keys caches.

    Values are normalised on creation (ints stay ints, damping is a float, classes a tuple), so
    settings that compare equal also hash equal in Streamlit's caches, which tell 0 from 0.0.

    Attributes:
        classes: indices into the dataset's class names, at least two, in the order the models
            number them (the sidebar gives them sorted, so one choice is one engine).
        max_train_per_class: at most this many training images per class (seeded subsample);
            ``None`` keeps every image.

    Raises:
        InfluenceExplorerError: fewer than two classes, or one class twice.
    """

    dataset: str = DEMO_SPEC
    image_size: int = 64
    classes: tuple[int, ...] = (0, 6)
    backbone: str = DEFAULT_BACKBONE
    k: int = 10
    estimate: str = ESTIMATES[0]
    solver: str = "exact"
    damping: float = 0.0
    max_train_per_class: int | None = DEFAULT_MAX_TRAIN_PER_CLASS
    #: sha256 of a network file uploaded on the "Your data" page: adds the third model.
    network: str | None = None

    def __post_init__(self) -> None:
        cap = self.max_train_per_class
        normal = {
            "dataset": str(self.dataset),
            "image_size": int(self.image_size),
            "classes": tuple(int(c) for c in self.classes),
            "k": int(self.k),
            "damping": float(self.damping),
            "max_train_per_class": None if cap is None else int(cap),
        }
        for name, value in normal.items():
            object.__setattr__(self, name, value)
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise InfluenceExplorerError(
                f"classes must list at least two different class indices; got {self.classes!r}."
            )

    def config(self) -> ExplainerConfig:
        """Core's configuration of the explainer these settings ask for.

        Raises:
            InfluenceExplorerError: settings core refuses.
        """
        return ExplainerConfig(
            classes=self.classes,
            backbone=self.backbone,
            solver=SolverConfig(method=self.solver, damping=self.damping),
            max_train_per_class=self.max_train_per_class,
            network=None if self.network is None else uploaded_network_spec(self.network),
        )

    @property
    def engine(self) -> EngineSpec:
        """The part of the settings that identifies a fitted explainer.

        Raises:
            InfluenceExplorerError: settings core refuses.
        """
        return EngineSpec(self.dataset, self.image_size, self.config())


def store_settings(settings: Settings) -> None:
    st.session_state[_SETTINGS] = settings


def current_settings() -> Settings:
    """The settings chosen in the sidebar of this session (defaults before the first run)."""
    settings = st.session_state.get(_SETTINGS)
    return settings if isinstance(settings, Settings) else Settings()


def data_roots() -> list[Path]:
    """The server's allowed dataset directories, from $INFLUENCE_DATA_ROOTS (none by default)."""
    raw = os.environ.get(DATA_ROOTS_ENV, "")
    return [Path(part).expanduser() for part in raw.split(os.pathsep) if part.strip()]


def dataset_choices() -> list[DatasetChoice]:
    """The bundled demo, the Debian Fashion-MNIST files if installed, and directories directly
    under the configured data roots (only listed here; opening one still goes through
    :func:`core.data.resolve_under_roots`)."""
    choices = [DatasetChoice(DEMO_SPEC, "Bundled demo (Fashion-MNIST subset)")]
    if DEBIAN_FASHION_MNIST_DIR.is_dir():
        choices.append(
            DatasetChoice(FASHION_MNIST_SPEC, "Fashion-MNIST (full, 60k; Debian package)")
        )
    for root in data_roots():
        try:
            resolved_root = root.resolve()
            entries = sorted(
                p
                for p in root.iterdir()
                if p.is_dir()
                and not p.name.startswith(".")
                # A symlink leading out of the root would be refused on opening; do not offer it.
                and p.resolve().is_relative_to(resolved_root)
            )
        except OSError:
            continue
        for entry in entries[:50]:
            label = f"{printable(entry.name)}  ({printable(root)})"
            choices.append(DatasetChoice(str(entry), label))
    return choices


def uploaded_dataset_hash(spec: str) -> str | None:
    """The content hash in an "upload:<hash>" spec, else None."""
    return spec[len(UPLOAD_PREFIX) :] if str(spec).startswith(UPLOAD_PREFIX) else None


@st.cache_resource(max_entries=16, show_spinner=False)
def uploaded_network_spec(content_hash: str) -> NetworkSpec:
    """Core's reference to an uploaded network file (checked when it was stored).

    Raises:
        NetworkError: no such network in the store.
    """
    return NetworkUploads().get(content_hash).spec


@st.cache_resource(max_entries=4, show_spinner="Loading the dataset…")
def _load_dataset(spec: str, image_size: int) -> Dataset:
    if spec in (DEMO_SPEC, FASHION_MNIST_SPEC):
        return open_dataset(spec)
    uploaded = uploaded_dataset_hash(spec)
    if uploaded is not None:
        # The store checked the files when they were unpacked; the loader checks them again.
        return DatasetUploads().get(uploaded).open((image_size, image_size))
    # Every file read must lie under the roots (a link leading out of them is refused).
    return open_dataset(spec, image_size=(image_size, image_size), roots=data_roots())


def forget_loaded_datasets() -> None:
    """Drop every loaded dataset (e.g. after an uploaded one is deleted); others reload."""
    _load_dataset.clear()


def load_dataset(spec: str, image_size: int) -> Dataset:
    """A dataset by spec: "demo", "fashion-mnist", a directory under the data roots or an
    uploaded dataset ("upload:<content hash>").

    Raises:
        InfluenceExplorerError: the path is outside the roots, missing or not a dataset.
    """
    if spec not in (DEMO_SPEC, FASHION_MNIST_SPEC) and uploaded_dataset_hash(spec) is None:
        # Cached by the resolved path, not the text typed: "./pets" and "pets/" are one dataset.
        spec = str(resolve_under_roots(spec, data_roots()))
    return _load_dataset(spec, int(image_size))


def class_names(dataset: Dataset) -> tuple[str, ...]:
    return tuple(dataset.class_names)


def default_pair(dataset: Dataset) -> tuple[int, int]:
    first, second = default_classes(dataset)
    return int(first), int(second)


def largest_class(dataset: Dataset) -> int:
    """Training images in the dataset's largest class: above the per-class cap, the sidebar
    offers every image as a choice."""
    return int(np.bincount(np.asarray(dataset.train_labels)).max())


def dataset_is_directory(spec: str) -> bool:
    return spec not in (DEMO_SPEC, FASHION_MNIST_SPEC)


def backbone_choices() -> list[BackboneChoice]:
    """ImageNet backbones for the logistic regression, each with whether it can be used here."""
    return [
        BackboneChoice(status.name, status.label, status.available, status.reason)
        for status in available_backbones()
        if status.name != "pixels"
    ]
