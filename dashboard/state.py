"""The one dashboard module that calls core: shared engines, cached results, per-session state.

Three kinds of state, kept apart on purpose:

- **Shared, read-only engines** (``st.cache_resource``): datasets and fitted
  :class:`~core.explainer.Explainer` objects. An explainer is built by a :class:`Preparation`, a
  background thread that any number of sessions can watch; the cache holds the preparation, so a
  second user arriving during the first build sees the same progress instead of starting another.
- **Shared, content-keyed results** (``st.cache_data`` with ``max_entries``): explanations and
  heatmaps, keyed by the engine's settings and the query's content (a test index, or the sha256 of
  an uploaded image's decoded pixels), never by anything that identifies a session or a user.
- **Per-session state** (``st.session_state``): the settings chosen in the sidebar, the selected
  test image or upload, the training image being inspected, and verification results. Keys used
  here start with ``state_``; widget keys carry their page's prefix (``side_``, ``explain_``, ...).

Pages stay thin: they call the functions below and render what comes back. A new page that needs
the current explainer and query calls :func:`require_explainer` and :func:`current_query`.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

import numpy as np
import streamlit as st
from scipy import stats

from core import attack as core_attack
from core import groups as core_groups
from core import mislabel as core_mislabel
from core.data import DEBIAN_FASHION_MNIST_DIR, Dataset, open_dataset, resolve_under_roots
from core.errors import (
    ConvergenceError,
    ImageDecodeError,
    InfluenceExplorerError,
    NonFiniteFeaturesError,
    NotPositiveDefiniteError,
    SolverDivergedError,
)
from core.explainer import MODEL_KEYS, Explainer, ExplainerConfig, Explanation, default_classes
from core.features import DEFAULT_BACKBONE, available_backbones
from core.fragility import (
    Architecture,
    CorrelationSeries,
    FragilityConfig,
    FragilityResults,
    SeriesPoint,
    Setting,
    SettingResult,
    SolverComparison,
    bundled_results_path,
    correlation_series,
    load_results,
    run_setting,
    solver_comparison,
    solver_label,
)
from core.images import DEFAULT_MAX_BYTES, SUPPORTED_EXTENSIONS, decode_upload
from core.influence import ESTIMATES, SolverConfig
from core.labels import (  # noqa: F401 (the pages read them from here)
    ESTIMATE_LABELS,
    GROUP_ESTIMATE_DESCRIPTIONS,
    GROUP_ESTIMATE_LABELS,
    GROUP_KIND_LABELS,
    RANKING_LABELS,
    SOLVER_LABELS,
    TEST_POINT_DESCRIPTIONS,
    TEST_POINT_LABELS,
)
from core.store import ArtifactStore
from core.validation import Verification

#: Directories the server allows datasets to be read from, separated by os.pathsep.
DATA_ROOTS_ENV = "INFLUENCE_DATA_ROOTS"

DEMO_SPEC = "demo"
FASHION_MNIST_SPEC = "fashion-mnist"

#: Upload limit in MiB for the upload widget; equal to core.images' byte limit (and config.toml).
MAX_UPLOAD_MB = DEFAULT_MAX_BYTES // 2**20
#: File-name suffixes the upload widget offers (the decoder sniffs content, not names).
UPLOAD_TYPES: tuple[str, ...] = tuple(sorted(ext.lstrip(".") for ext in SUPPORTED_EXTENSIONS))

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

SIGN_CONVENTION = (
    "Influence score ≈ test loss after removing the training image − test loss with it. "
    "**Positive: it helped** the prediction (removing it would raise the loss); "
    "**negative: it hurt**. Units: test loss."
)

# Session-state keys owned by this module.
_SETTINGS = "state_settings"
_TEST_INDEX = "state_test_index"
_SOURCE = "state_source"
_UPLOAD = "state_upload"
_UPLOAD_ERROR = "state_upload_error"
_UPLOAD_FILE_ID = "state_upload_file_id"
_INSPECT = "state_inspect"
_VERIFICATIONS = "state_verifications"
#: Verifications remembered per session (oldest dropped first), to keep sessions small.
MAX_VERIFICATIONS_PER_SESSION = 20


# --------------------------------------------------------------------------- widget values

#: Page widgets whose values should survive a visit to another page. Streamlit forgets a widget's
#: value when a run does not draw it; re-saving it at the start of every run keeps it.
PERSISTENT_WIDGETS: tuple[str, ...] = (
    "explain_gallery_filter",
    "explain_gallery_page",
    "verify_k",
    # Training data pages (the test-image inputs are left out on purpose: they start from the
    # image chosen on Explain each time the page is opened).
    "groups_model",
    "groups_kinds",
    "groups_sizes",
    "groups_per_size",
    "groups_custom",
    "groups_seed",
    "clean_model",
    "clean_k",
    "clean_flip_percent",
    "clean_checkpoints",
    "clean_seed",
    "attack_model",
    "attack_budget",
    "attack_step_size",
    "attack_steps",
    "attack_n_perturb",
    "attack_retrain",
)


def keep_widget_values(keys: Sequence[str] = PERSISTENT_WIDGETS) -> None:
    """Called by the entrypoint before any page: keep ``keys``' values across pages."""
    for key in keys:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DatasetChoice:
    """A dataset the sidebar offers: the spec given to core and a label for people."""

    spec: str
    label: str


@dataclass(frozen=True)
class BackboneChoice:
    name: str
    label: str
    available: bool
    reason: str


@dataclass(frozen=True)
class Settings:
    """Everything the sidebar decides. Frozen and made of primitives, so it can key caches."""

    dataset: str = DEMO_SPEC
    image_size: int = 64
    classes: tuple[int, int] = (0, 6)
    backbone: str = DEFAULT_BACKBONE
    k: int = 10
    estimate: str = "corrected"
    solver: str = "exact"
    damping: float = 0.0
    max_train_per_class: int = DEFAULT_MAX_TRAIN_PER_CLASS

    @property
    def engine_key(self) -> tuple[Any, ...]:
        """What identifies a fitted explainer (k and the estimate only change the query)."""
        return (
            self.dataset,
            self.image_size,
            self.classes,
            self.backbone,
            self.solver,
            self.damping,
            self.max_train_per_class,
        )

    def config(self) -> ExplainerConfig:
        return ExplainerConfig(
            classes=self.classes,
            backbone=self.backbone,
            solver=SolverConfig(method=self.solver, damping=self.damping),
            max_train_per_class=self.max_train_per_class,
        )


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
        choices.append(DatasetChoice(FASHION_MNIST_SPEC, "Fashion-MNIST (full, Debian package)"))
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
            choices.append(DatasetChoice(str(entry), f"{entry.name}  ({root})"))
    return choices


@st.cache_resource(max_entries=4, show_spinner="Loading the dataset…")
def _load_dataset(spec: str, image_size: int) -> Dataset:
    if spec in (DEMO_SPEC, FASHION_MNIST_SPEC):
        return open_dataset(spec)
    path = resolve_under_roots(spec, data_roots())
    return open_dataset(path, image_size=(image_size, image_size))


def load_dataset(spec: str, image_size: int) -> Dataset:
    """A dataset by spec: "demo", "fashion-mnist" or a directory under the data roots.

    Raises:
        InfluenceExplorerError: the path is outside the roots, missing or not a dataset.
    """
    return _load_dataset(spec, int(image_size))


def class_names(dataset: Dataset) -> tuple[str, ...]:
    return tuple(dataset.class_names)


def default_pair(dataset: Dataset) -> tuple[int, int]:
    first, second = default_classes(dataset)
    return int(first), int(second)


def dataset_is_directory(spec: str) -> bool:
    return spec not in (DEMO_SPEC, FASHION_MNIST_SPEC)


def backbone_choices() -> list[BackboneChoice]:
    """ImageNet backbones for the logistic regression, each with whether it can be used here."""
    return [
        BackboneChoice(status.name, status.label, status.available, status.reason)
        for status in available_backbones()
        if status.name != "pixels"
    ]


def store_settings(settings: Settings) -> None:
    st.session_state[_SETTINGS] = settings


def current_settings() -> Settings:
    """The settings chosen in the sidebar of this session (defaults before the first run)."""
    settings = st.session_state.get(_SETTINGS)
    return settings if isinstance(settings, Settings) else Settings()


# --------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class ProgressSnapshot:
    stage: str
    done: int
    total: int
    elapsed: float

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, self.done / self.total)


class Preparation:
    """Builds an explainer in a background thread and reports progress to whoever watches.

    Nothing here touches Streamlit, so it is safe to create inside ``st.cache_resource`` and to
    watch from many sessions at once. A session that navigates away stops watching; the build goes
    on and the next visitor finds it further along (or done).
    """

    def __init__(self, build: Callable[[Callable[[str, int, int], None]], Explainer]) -> None:
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._stage, self._done, self._total = "Starting", 0, 0
        self._started = time.monotonic()
        self.seconds: float | None = None
        self.result: Explainer | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(build,), name="influence-explorer-prepare", daemon=True
        )
        self._thread.start()

    def _report(self, stage: str, done: int, total: int) -> None:
        with self._lock:
            self._stage, self._done, self._total = stage, int(done), int(total)

    def _run(self, build: Callable[[Callable[[str, int, int], None]], Explainer]) -> None:
        try:
            self.result = build(self._report)
        except BaseException as exc:  # handed to the page, which decides how to show it
            self.error = exc
        finally:
            self.seconds = time.monotonic() - self._started
            self._finished.set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float) -> bool:
        return self._finished.wait(timeout)

    def snapshot(self) -> ProgressSnapshot:
        with self._lock:
            return ProgressSnapshot(
                self._stage, self._done, self._total, time.monotonic() - self._started
            )


@st.cache_resource(max_entries=4, show_spinner=False)
def _preparation(engine_key: tuple[Any, ...], _dataset: Dataset) -> Preparation:
    # engine_key determines _dataset (its first two fields are the dataset's spec and size).
    config = _settings_from_engine_key(engine_key).config()

    def build(progress: Callable[[str, int, int], None]) -> Explainer:
        return Explainer(_dataset, config, store=ArtifactStore(), progress=progress)

    return Preparation(build)


def _settings_from_engine_key(engine_key: tuple[Any, ...]) -> Settings:
    dataset, image_size, classes, backbone, solver, damping, max_train = engine_key
    return Settings(
        dataset=dataset,
        image_size=image_size,
        classes=classes,
        backbone=backbone,
        solver=solver,
        damping=damping,
        max_train_per_class=max_train,
    )


def preparation(settings: Settings) -> Preparation:
    """The shared preparation of the explainer for these settings (started on first call).

    Raises:
        InfluenceExplorerError: the dataset cannot be opened or the settings are invalid.
    """
    dataset = load_dataset(settings.dataset, settings.image_size)
    settings.config()  # validate in this thread, so the error reaches the page directly
    return _preparation(settings.engine_key, dataset)


def explainer_if_ready(settings: Settings | None = None) -> Explainer | None:
    """The explainer if it is built, without waiting (for pages that can do without)."""
    settings = settings or current_settings()
    try:
        job = preparation(settings)
    except InfluenceExplorerError:
        return None
    return job.result if job.finished else None


def require_explainer(settings: Settings | None = None) -> Explainer:
    """The explainer for the sidebar's settings; shows progress while it is prepared.

    On a domain error (e.g. an unavailable backbone) shows ``st.error`` with a retry button and
    stops the page; any other exception is raised, so tests see it.
    """
    settings = settings or current_settings()
    try:
        job = preparation(settings)
    except InfluenceExplorerError as exc:
        st.error(error_message(exc, settings))
        st.stop()
    if not job.finished:
        with st.status("Preparing the models (first launch only)…", expanded=True) as status:
            st.caption(
                "Features are computed once and cached on disk; fitting both models and their "
                "influence engines follows. Later launches take seconds."
            )
            bar = st.progress(0.0, text="Starting…")
            while not job.wait(0.3):
                snap = job.snapshot()
                detail = f" ({snap.done}/{snap.total})" if snap.total else ""
                bar.progress(snap.fraction, text=f"{snap.stage}{detail} · {snap.elapsed:.0f} s")
            failed = job.error is not None
            status.update(
                label="Preparation failed" if failed else f"Models ready ({job.seconds:.0f} s)",
                state="error" if failed else "complete",
                expanded=False,
            )
    if job.error is not None:
        if not isinstance(job.error, InfluenceExplorerError):
            raise job.error
        st.error(error_message(job.error, settings))
        if st.button("Try again", key="state_retry_preparation"):
            _preparation.clear(settings.engine_key, None)
            st.rerun()
        st.stop()
    assert job.result is not None
    for warning in job.result.warnings:
        # E.g. LiSSA too short to have converged: the scores are shown, with this caveat.
        st.warning(f"{warning}\n\n**In this dashboard:** {_SOLVER_FIX}", icon="⚠️")
    return job.result


_SOLVER_FIX = (
    "choose *Exact (Cholesky)* as the solver, or a larger *Damping*, in the sidebar under "
    "*Advanced*."
)


def error_message(error: InfluenceExplorerError, settings: Settings | None = None) -> str:
    """Core's message for a domain error, plus what to change in this dashboard to fix it.

    Core's messages name settings as the engine knows them (damping, lissa_depth, a weights
    file); the sidebar offers fewer, so where one of its controls is the fix, say which.
    """
    settings = settings or current_settings()
    fix = None
    if isinstance(error, NotPositiveDefiniteError):
        suggested = error.suggested_damping
        enough = [d for d in DAMPING_CHOICES if suggested is not None and d >= suggested]
        fix = (
            f"set *Damping* to {enough[0]:g} or more in the sidebar under *Advanced*."
            if enough
            else "choose a larger *Damping* in the sidebar under *Advanced*."
        )
    elif isinstance(error, (SolverDivergedError, ConvergenceError)) and settings.solver != "exact":
        fix = _SOLVER_FIX
    elif isinstance(error, SolverDivergedError):
        fix = "choose a larger *Damping* in the sidebar under *Advanced*."
    elif isinstance(error, NonFiniteFeaturesError):
        fix = "choose another backbone in the sidebar."
    return str(error) if fix is None else f"{error}\n\n**In this dashboard:** {fix}"


# --------------------------------------------------------------------------- uploads


@dataclass(frozen=True, eq=False)
class Upload:
    """An uploaded image, decoded into a dataset's format.

    Attributes:
        name: the file name as uploaded (display only; never used as a path).
        image: (H, W, C) uint8, exactly what the models see.
        notes: what decoding did, e.g. "inverted to light-on-dark".
        digest: sha256 of the decoded pixels and shape: the content key for shared caches.
        image_format: ((H, W, C), light_on_dark) it was decoded for.
        description: the original file, e.g. "PNG, 640×480, RGB".
    """

    name: str
    image: np.ndarray
    notes: tuple[str, ...]
    digest: str
    image_format: tuple[tuple[int, int, int], bool]
    description: str


@dataclass(frozen=True)
class UploadOutcome:
    """Either an :class:`Upload` or a message for the user (never both)."""

    upload: Upload | None = None
    error: str | None = None


def _image_digest(image: np.ndarray) -> str:
    digest = hashlib.sha256(f"{image.shape}:{image.dtype.str}\0".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def decode_uploaded_file(
    name: str,
    data: bytes | IO[bytes],
    *,
    image_shape: tuple[int, int, int],
    light_on_dark: bool,
) -> UploadOutcome:
    """Decode an uploaded file for a dataset; a bad file gives a message, never an exception.

    Reads at most one byte more than the limit, so an oversized stream is refused unread.

    Args:
        name: the uploaded file's name (shown, never opened).
        data: the bytes, or a binary file object (e.g. Streamlit's UploadedFile).
        image_shape: (H, W, C) of the dataset's images.
        light_on_dark: the dataset's convention (see core.images).
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    else:
        if getattr(data, "seekable", lambda: False)():
            data.seek(0)
        raw = data.read(DEFAULT_MAX_BYTES + 1)
    try:
        decoded = decode_upload(raw, target_shape=image_shape, light_on_dark=light_on_dark)
    except ImageDecodeError as exc:
        return UploadOutcome(error=f"{as_code(_display_name(name))} could not be used: {exc}")
    image = np.asarray(decoded.image)
    width, height = decoded.original_size
    return UploadOutcome(
        upload=Upload(
            name=_display_name(name),
            image=image,
            notes=tuple(decoded.notes),
            digest=_image_digest(image),
            image_format=(tuple(int(v) for v in image.shape), bool(light_on_dark)),  # type: ignore[arg-type]
            description=f"{decoded.format}, {width}×{height}, {decoded.original_mode}",
        )
    )


def _display_name(name: str) -> str:
    # Only the last path component, printable, bounded: the name is shown, never trusted.
    base = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch if ch.isprintable() and ch != "`" else "?" for ch in base)[:80]
    return cleaned or "upload"


def as_code(text: str) -> str:
    """``text`` as a Markdown code span, so a file name like "[x](http://…)" or "$x$" is shown
    literally rather than rendered as a link or LaTeX. ``text`` must not contain backticks."""
    return f"`{text}`"


def accept_upload(uploaded: Any, explainer: Explainer) -> None:
    """Handle the upload widget's current file for this session (once per file).

    A good file becomes the session's query; a bad one leaves the query as it was and records a
    message that :func:`upload_error` returns until the next upload.
    """
    if uploaded is None:
        return
    file_id = getattr(uploaded, "file_id", None) or id(uploaded)
    if st.session_state.get(_UPLOAD_FILE_ID) == file_id:
        return
    st.session_state[_UPLOAD_FILE_ID] = file_id
    dataset = explainer.dataset
    outcome = decode_uploaded_file(
        getattr(uploaded, "name", "upload"),
        uploaded,
        image_shape=dataset.image_shape,
        light_on_dark=dataset.light_on_dark,
    )
    if outcome.error is not None:
        st.session_state[_UPLOAD_ERROR] = outcome.error
        return
    st.session_state[_UPLOAD_ERROR] = None
    st.session_state[_UPLOAD] = outcome.upload
    st.session_state[_SOURCE] = "upload"
    st.session_state[_INSPECT] = None


def upload_error() -> str | None:
    return st.session_state.get(_UPLOAD_ERROR)


def current_upload(explainer: Explainer) -> Upload | None:
    """This session's upload, if it was decoded for this explainer's image format."""
    upload = st.session_state.get(_UPLOAD)
    dataset = explainer.dataset
    if isinstance(upload, Upload) and upload.image_format == (
        dataset.image_shape,
        dataset.light_on_dark,
    ):
        return upload
    return None


def upload_is_for_another_dataset(explainer: Explainer) -> bool:
    """True if this session's upload was decoded for another image format than this dataset's
    (the user switched datasets); it is then not explained until uploaded again."""
    upload = st.session_state.get(_UPLOAD)
    return (
        isinstance(upload, Upload)
        and st.session_state.get(_SOURCE) == "upload"
        and current_upload(explainer) is None
    )


# --------------------------------------------------------------------------- the query


@dataclass(frozen=True, eq=False)
class Query:
    """What is being explained in this session: a test image or an upload.

    Attributes:
        key: a content key, "test:<index>" or "upload:<sha256>", for shared caches.
        test_index: the test row, or None for an upload.
        upload: the upload, or None.
        image: (H, W, C) uint8 as the models see it.
        title: e.g. "Test image #12" or "Uploaded photo.png".
    """

    key: str
    test_index: int | None
    upload: Upload | None
    image: np.ndarray
    title: str

    def engine_args(self) -> dict[str, Any]:
        if self.upload is not None:
            return {"image": self.upload.image}
        return {"test_index": self.test_index}


def selected_test_index(explainer: Explainer) -> int:
    index = int(st.session_state.get(_TEST_INDEX, 0) or 0)
    return min(max(index, 0), explainer.n_test - 1)


def select_test_image(index: int) -> None:
    """Callback: explain test image ``index`` (switches away from an upload)."""
    st.session_state[_TEST_INDEX] = int(index)
    st.session_state[_SOURCE] = "test"
    st.session_state[_INSPECT] = None
    st.session_state[_UPLOAD_ERROR] = None


def show_test_images() -> None:
    """Callback: explain the selected test image again (the upload is kept for later)."""
    st.session_state[_SOURCE] = "test"
    st.session_state[_INSPECT] = None
    st.session_state[_UPLOAD_ERROR] = None


def select_upload() -> None:
    """Callback: explain this session's upload again."""
    st.session_state[_SOURCE] = "upload"
    st.session_state[_INSPECT] = None


def current_query(explainer: Explainer) -> Query:
    """This session's query for this explainer (the upload if chosen, else a test image)."""
    upload = current_upload(explainer)
    if upload is not None and st.session_state.get(_SOURCE) == "upload":
        return Query(
            key=f"upload:{upload.digest}",
            test_index=None,
            upload=upload,
            image=upload.image,
            title=f"Uploaded {as_code(upload.name)}",
        )
    index = selected_test_index(explainer)
    return Query(
        key=f"test:{index}",
        test_index=index,
        upload=None,
        image=explainer.dataset.test_images[index],
        title=f"Test image #{index}",
    )


# --------------------------------------------------------------------------- explanations


@st.cache_data(max_entries=64, show_spinner=False)
def _explanation(
    engine_key: tuple[Any, ...],
    query_key: str,
    k: int,
    estimate: str,
    _explainer: Explainer,
    _engine_args: dict[str, Any],
) -> Explanation:
    return _explainer.explain(k=k, estimate=estimate, **_engine_args)


def _stop_on_domain_error(exc: InfluenceExplorerError) -> NoReturn:
    st.error(error_message(exc))
    st.stop()


def explain(explainer: Explainer, query: Query, settings: Settings) -> Explanation:
    """Both models' explanation of the query (cached by engine, query content, k and estimate).

    A domain error (e.g. a diverging LiSSA estimate) is shown with ``st.error`` and stops the page.
    """
    try:
        return _explanation(
            settings.engine_key,
            query.key,
            int(settings.k),
            settings.estimate,
            explainer,
            query.engine_args(),
        )
    except InfluenceExplorerError as exc:
        _stop_on_domain_error(exc)


@st.cache_data(max_entries=128, show_spinner=False)
def _heatmap(
    engine_key: tuple[Any, ...],
    query_key: str,
    model_key: str,
    train_index: int,
    _explainer: Explainer,
    _engine_args: dict[str, Any],
) -> np.ndarray:
    return _explainer.heatmap(model_key, train_index, **_engine_args)


def heatmap(
    explainer: Explainer, query: Query, settings: Settings, model_key: str, train_index: int
) -> np.ndarray:
    """(H, W, C) d(test loss)/d(pixel) of one training image, for one model.

    A domain error is shown with ``st.error`` and stops the page.
    """
    try:
        return _heatmap(
            settings.engine_key,
            query.key,
            model_key,
            int(train_index),
            explainer,
            query.engine_args(),
        )
    except InfluenceExplorerError as exc:
        _stop_on_domain_error(exc)


def train_image(explainer: Explainer, train_index: int) -> np.ndarray:
    return explainer.dataset.train_images[int(train_index)]


def model_labels(explainer: Explainer) -> dict[str, str]:
    return {key: explainer.models[key].label for key in MODEL_KEYS}


def inspect(model_key: str, train_index: int, query_key: str) -> None:
    """Callback: show the heatmap view of one training image for one model."""
    st.session_state[_INSPECT] = (model_key, int(train_index), query_key)


def close_inspector() -> None:
    st.session_state[_INSPECT] = None


def inspected(query: Query) -> tuple[str, int] | None:
    """(model key, train index) being inspected for this query, if any."""
    value = st.session_state.get(_INSPECT)
    if not value or value[2] != query.key:
        return None
    return value[0], value[1]


# --------------------------------------------------------------------------- the gallery


@dataclass(frozen=True)
class Gallery:
    """Test images with both models' predictions, for the picker.

    Attributes:
        indices: (m,) test rows passing the filter.
        true_labels, svm_predictions, logreg_predictions: (n_test,) class indices.
        class_names: label names.
    """

    indices: np.ndarray
    true_labels: np.ndarray
    svm_predictions: np.ndarray
    logreg_predictions: np.ndarray
    class_names: tuple[str, ...]


GALLERY_FILTERS = {
    "all": "All",
    "misclassified": "Misclassified by either",
    "disagree": "Models disagree",
}


def gallery(explainer: Explainer, which: str) -> Gallery:
    true = np.asarray(explainer.test_labels)
    svm = explainer.test_probabilities("svm").argmax(1)
    logreg = explainer.test_probabilities("logreg").argmax(1)
    if which == "misclassified":
        mask = (svm != true) | (logreg != true)
    elif which == "disagree":
        mask = svm != logreg
    else:
        mask = np.ones(len(true), dtype=bool)
    return Gallery(np.flatnonzero(mask), true, svm, logreg, tuple(explainer.class_names))


def test_image(explainer: Explainer, index: int) -> np.ndarray:
    return explainer.dataset.test_images[int(index)]


# --------------------------------------------------------------------------- compare


@dataclass(frozen=True)
class Comparison:
    """How the two models' explanations of one query relate.

    Attributes:
        spearman: rank correlation of the two models' scores over every training image.
        overlap_helpful, overlap_harmful: how many of the top-k helpful (harmful) images the two
            models share, out of ``k``.
        label_makeup: model key -> {"helpful"|"harmful": {label name: count}}.
    """

    spearman: float
    overlap_helpful: int
    overlap_harmful: int
    k: int
    label_makeup: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)


def compare(explanation: Explanation, class_names: Sequence[str]) -> Comparison:
    svm, logreg = explanation.models["svm"], explanation.models["logreg"]
    rho = float(stats.spearmanr(svm.scores, logreg.scores).statistic)

    def ids(items: Sequence[Any]) -> set[int]:
        return {item.train_index for item in items}

    makeup: dict[str, dict[str, dict[str, int]]] = {}
    for key, model in explanation.models.items():
        makeup[key] = {}
        for kind in ("helpful", "harmful"):
            counts = dict.fromkeys(class_names, 0)
            for item in getattr(model, kind):
                counts[item.label_name] += 1
            makeup[key][kind] = counts
    k = max(len(svm.helpful), len(logreg.helpful), len(svm.harmful), len(logreg.harmful), 1)
    return Comparison(
        spearman=rho,
        overlap_helpful=len(ids(svm.helpful) & ids(logreg.helpful)),
        overlap_harmful=len(ids(svm.harmful) & ids(logreg.harmful)),
        k=k,
        label_makeup=makeup,
    )


def train_labels(explainer: Explainer) -> np.ndarray:
    return np.asarray(explainer.train_labels)


def train_ids(explainer: Explainer) -> np.ndarray:
    return np.asarray(explainer.dataset.train_ids)


# --------------------------------------------------------------------------- verify


def _verification_key(settings: Settings, query: Query, k: int) -> tuple[Any, ...]:
    return (settings.engine_key, query.key, int(k))


def verification(settings: Settings, query: Query, k: int) -> dict[str, Verification] | None:
    """Results of an earlier verification of this query in this session, if any."""
    return st.session_state.get(_VERIFICATIONS, {}).get(_verification_key(settings, query, k))


def verified_queries(settings: Settings) -> list[tuple[str, int]]:
    """(what, k) verified in this session for the current engine, oldest first."""
    out = []
    for engine_key, query_key, k in st.session_state.get(_VERIFICATIONS, {}):
        if engine_key != settings.engine_key:
            continue
        kind, _, value = query_key.partition(":")
        out.append((f"test image #{value}" if kind == "test" else f"upload {value[:8]}", k))
    return out


def run_verification(
    explainer: Explainer,
    query: Query,
    settings: Settings,
    k: int,
    progress: Callable[[str, int, int], None],
) -> dict[str, Verification]:
    """Retrain both models without each of the top-k images and remember the result here.

    ``progress(stage, done, total)`` is called after every retrain; when it raises (Streamlit
    stops the script because the user navigated away), retraining stops with it.
    """
    result = explainer.verify(k=int(k), progress=progress, **query.engine_args())
    remembered = dict(st.session_state.get(_VERIFICATIONS, {}))
    remembered[_verification_key(settings, query, k)] = result
    while len(remembered) > MAX_VERIFICATIONS_PER_SESSION:
        remembered.pop(next(iter(remembered)))
    st.session_state[_VERIFICATIONS] = remembered
    return result


# --------------------------------------------------------------------------- trust
# The Trust page (Basu, Pope & Feizi's fragility study) and the line linking each explanation
# to it. The committed study (docs/fragility-results.json) is shared read-only data, cached by
# the file's identity; a live run of one setting is cached by its content (the Setting and the
# study's frozen FragilityConfig), so sessions asking the same question share it, and each
# session remembers the runs it asked for so they are shown again when the user comes back.

TRUST_PAGE = "app_pages/trust.py"
#: Networks offered for a live run: the quick grid's and the committed grid's.
TRUST_ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(1, 4),
    Architecture(2, 4),
    Architecture(1, 8),
    Architecture(2, 8),
    Architecture(3, 8),
    Architecture(4, 8),
    Architecture(2, 16),
)
TRUST_WEIGHT_DECAYS: tuple[float, ...] = (1e-3, 0.0)
#: The live run's default protocol: the CLI's ``--quick`` grid (200 images, 60 epochs, one
#: seed); its smallest setting takes about 20 s on one busy core.
TRUST_QUICK_CONFIG = FragilityConfig.quick()
#: Explain's model keys -> the committed study's reference rows.
_REFERENCE_MODELS = {"svm": "svm", "logreg": "logistic"}
#: Live runs remembered per session, as many as the Training data pages' results.
_TRUST_RUNS = "state_trust_runs"


@st.cache_data(max_entries=2, show_spinner="Reading the fragility results…")
def _fragility_results(path: str, modified_ns: int, size: int) -> FragilityResults:
    # modified_ns and size only key the cache: a regenerated file is read again.
    return load_results(path)


def fragility_results() -> FragilityResults:
    """The committed full-grid study (docs/fragility-results.json).

    Raises:
        InfluenceExplorerError: the file is missing, damaged or of another format version.
    """
    path = bundled_results_path()
    try:
        info = path.stat()
    except OSError:
        return load_results(path)  # raises the domain error that says how to regenerate it
    return _fragility_results(str(path), info.st_mtime_ns, info.st_size)


def fragility_series(
    results: FragilityResults, vary: str, test_point: str, weight_decay: float
) -> tuple[str, tuple[CorrelationSeries, ...]]:
    """A chart panel: correlation against ``vary`` ("depth" or "width") for one test point and
    weight decay, one series per solver, and the panel's title (which says what is held fixed).

    The "exact (last layer)" networks are added as their own series even when there is only one
    on the line (core's series need two networks): they show what the last-layer shortcut costs.
    """
    series = correlation_series(results, vary, test_point=test_point, weight_decay=weight_decay)
    if not series:
        return f"Against {vary}", ()
    # The most populated line fixes the other dimension (the committed grid has one per panel).
    fixed = max(series, key=lambda c: len(c.points)).fixed
    chosen = [c for c in series if c.fixed == fixed]
    last = []
    for s in results.settings:
        if s.model != "cnn" or s.skipped or s.weight_decay != weight_decay:
            continue
        x, other = (s.depth, s.width) if vary == "depth" else (s.width, s.depth)
        result = s.solver("exact", "last")
        point = result.point(test_point) if result is not None else None
        if other == fixed and point is not None:
            last.append(SeriesPoint(x, s.label, s.n_params, point.pearson, point.spearman))
    if last and not any(c.solver == "exact (last layer)" for c in chosen):
        chosen.append(
            CorrelationSeries(
                vary,
                fixed,
                solver_label("exact", "last"),
                test_point,
                weight_decay,
                tuple(sorted(last, key=lambda p: p.x)),
            )
        )
    other_name = "width" if vary == "depth" else "depth"
    return f"Against {vary} ({other_name} {fixed})", tuple(chosen)


def fragility_solver_comparison(results: FragilityResults) -> tuple[SolverComparison, ...]:
    """LiSSA against the exact solution (CG where exact covered only the last layer)."""
    return solver_comparison(results, "lissa", "exact")


@dataclass(frozen=True)
class TrustProtocol:
    """A protocol a live run can follow: the study's configuration and a plain description."""

    name: str
    label: str
    config: FragilityConfig
    description: str


def _describe_protocol(config: FragilityConfig) -> str:
    gt = config.ground_truth
    solvers = ", ".join(solver_label(s, "all") for s in config.influence.solvers)
    return (
        f"{config.n_train} training images ({config.image_size}×{config.image_size}), "
        f"{config.training.epochs} epochs of SGD, solvers {solvers}; ground truth: retrain "
        f"without each of the top {gt.top_k} for {gt.retrain_fraction:g} of the epochs, "
        f"{gt.seeds} minibatch order{'s' if gt.seeds != 1 else ''}"
    )


def trust_protocols(results: FragilityResults) -> dict[str, TrustProtocol]:
    """The live run's protocols: "quick" (the default) and "committed" (the table's own)."""
    return {
        "quick": TrustProtocol(
            "quick", "Quick", TRUST_QUICK_CONFIG, _describe_protocol(TRUST_QUICK_CONFIG)
        ),
        "committed": TrustProtocol(
            "committed",
            "As in the table",
            results.config,
            _describe_protocol(results.config),
        ),
    }


def trust_setting(architecture: Architecture, weight_decay: float) -> Setting:
    return Setting("cnn", float(weight_decay), architecture)


def committed_counterpart(
    results: FragilityResults, setting: Setting
) -> tuple[SettingResult | None, str]:
    """The committed network to compare a live run with, and how it relates to it.

    The same network and weight decay if the grid has it; otherwise the grid's closest network
    (same depth if possible, then the nearest width) with that weight decay, said so.
    """
    arch = setting.architecture
    candidates = [
        s
        for s in results.settings
        if s.model == "cnn" and not s.skipped and s.weight_decay == setting.weight_decay
    ]
    if arch is None or not candidates:
        return None, "The committed grid has no network with this weight decay."
    best = min(
        candidates,
        key=lambda s: (abs(s.depth - arch.depth), abs(math.log2(s.width / arch.width)), s.width),
    )
    if (best.depth, best.width) == (arch.depth, arch.width):
        return best, f"the committed {best.label}, {_weight_decay_text(best.weight_decay)}"
    return best, (
        f"the closest committed network, {best.label} ({arch.label} is not in the committed "
        f"grid), {_weight_decay_text(best.weight_decay)}"
    )


def _weight_decay_text(weight_decay: float) -> str:
    return "no weight decay" if weight_decay == 0 else f"weight decay {weight_decay:g}"


@st.cache_data(max_entries=16, show_spinner=False)
def _live_setting(setting: Setting, config: FragilityConfig) -> SettingResult:
    progress = _StageProgress(f"{setting.label}, {_weight_decay_text(setting.weight_decay)}")
    try:
        # One torch thread: these networks are so small that more threads only add overhead,
        # and the server's cores are shared with other sessions.
        return run_setting(
            setting,
            config,
            progress=lambda done, total, stage: progress(stage, done, total),
            threads=1,
        )
    finally:
        progress.clear()


def _trust_key(setting: Setting, config: FragilityConfig) -> tuple[Setting, FragilityConfig]:
    return (setting, config)


def trust_run(setting: Setting, config: FragilityConfig) -> SettingResult | None:
    """This session's earlier live run of exactly this setting and protocol, if any."""
    return _remembered(_TRUST_RUNS, _trust_key(setting, config))


def run_trust_setting(setting: Setting, config: FragilityConfig) -> SettingResult:
    """Train one network, compute its influence with every solver and retrain to check it, with
    a progress bar; shared by content across sessions and remembered for this one.

    Raises:
        InfluenceExplorerError: core refused the setting or a solver failed for good.
    """
    result = _live_setting(setting, config)
    _remember(_TRUST_RUNS, _trust_key(setting, config), result)
    return result


@dataclass(frozen=True)
class TrustReference:
    """How far one of Explain's models can be trusted, from the committed study's convex row.

    Attributes:
        row: the reference row's label, e.g. "RBF SVM (pixels)".
        estimate: the estimate the numbers are for (the one Explain shows, when recorded).
        cells: (test point name, Pearson, Spearman) per test point.
        measures: what the row measured, and how that differs from the model on Explain.
    """

    row: str
    estimate: str
    cells: tuple[tuple[str, float, float], ...]
    measures: str


def trust_reference(
    model_key: str, explainer: Explainer, settings: Settings
) -> TrustReference | None:
    """The committed reference row for one of Explain's models, or None if it cannot be read."""
    model = _REFERENCE_MODELS.get(model_key)
    try:
        results = fragility_results()
    except InfluenceExplorerError:
        return None
    row = next(
        (s for s in results.settings if s.model == model and not s.skipped and s.solvers), None
    )
    if row is None:
        return None
    points = row.solvers[0].points
    corrected = settings.estimate == "corrected" and all(
        math.isfinite(p.corrected_pearson) for p in points
    )
    cells = tuple(
        (
            TEST_POINT_LABELS.get(p.kind, p.kind),
            p.corrected_pearson if corrected else p.pearson,
            p.corrected_spearman if corrected else p.spearman,
        )
        for p in points
    )
    config = results.config
    same_pair = settings.dataset == DEMO_SPEC and tuple(explainer.class_names) == tuple(
        results.class_names
    )
    size = f"{config.image_size}×{config.image_size}"
    images = f"{config.n_train} training images of {' vs '.join(results.class_names)}"
    if not same_pair:
        images += " (another class pair than here)"
    if model == "logistic":
        measures = (
            f"logistic regression on raw {size} pixels (not on ImageNet features as here), {images}"
        )
    else:
        measures = f"an RBF SVM like this one, on {size} pixels, {images}"
    return TrustReference(
        row=row.label,
        estimate="Newton-corrected" if corrected else "first-order",
        cells=cells,
        measures=measures,
    )


# --------------------------------------------------------------------------- method


def summaries(explainer: Explainer) -> dict[str, Any]:
    return explainer.summaries()


ESTIMATE_NAMES: tuple[str, ...] = ESTIMATES


# --------------------------------------------------------------------------- training data
# The "Training data" pages (Groups, Data cleaning, Attack). Each experiment is computed by an
# st.cache_data function keyed by content: the engine's settings, the model, the test image and
# core's frozen config, never anything that identifies a session, so two sessions asking the same
# question share one computation. A session also remembers the results it asked for (bounded, like
# verifications) so that they are shown again, without a click, when the user comes back.

#: Results of each kind remembered per session (oldest dropped first).
MAX_TRAINING_DATA_RESULTS_PER_SESSION = 10
_GROUP_RESULTS = "state_group_results"
_MISLABEL_RESULTS = "state_mislabel_results"
_ATTACK_RESULTS = "state_attack_results"


def _remember(slot: str, key: tuple[Any, ...], value: Any) -> None:
    remembered = dict(st.session_state.get(slot, {}))
    remembered.pop(key, None)  # re-inserted below, as the newest
    remembered[key] = value
    while len(remembered) > MAX_TRAINING_DATA_RESULTS_PER_SESSION:
        remembered.pop(next(iter(remembered)))
    st.session_state[slot] = remembered


def _remembered(slot: str, key: tuple[Any, ...]) -> Any:
    return st.session_state.get(slot, {}).get(key)


def initial_value(key: str, value: Any) -> None:
    """Give widget ``key`` its first value through Session State, once per session.

    For widgets listed in :data:`PERSISTENT_WIDGETS`: their value is re-saved through Session State
    on every run, and a widget that also gets a ``value``/``default`` argument makes Streamlit warn.
    """
    if key not in st.session_state:
        st.session_state[key] = value


def forget_out_of_range(key: str, low: int, high: int) -> None:
    """Drop widget ``key``'s value if it is outside [low, high] (e.g. after a dataset change)."""
    value = st.session_state.get(key)
    if value is not None and not low <= value <= high:
        del st.session_state[key]


class _StageProgress:
    """``progress(stage, done, total)`` shown as a progress bar, for a cached computation.

    The bar is created inside the cached function on purpose: Streamlit records what a cached
    function draws and replays it on a cache hit, and a bar created outside the function would not
    exist during the replay (CacheReplayClosureError). Updates are thinned to whole percents so a
    replay stays short. Each update is also where Streamlit stops the run when the user navigates
    away; the computation stops with it and nothing is cached.
    """

    def __init__(self, title: str) -> None:
        self._title = title
        self._bar = st.progress(0.0, text=f"{title}: starting…")
        self._last: tuple[str, int] | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        fraction = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
        mark = (stage, int(100 * fraction))
        if mark == self._last:
            return
        self._last = mark
        self._bar.progress(fraction, text=f"{self._title} · {stage}: {done}/{total}")

    def clear(self) -> None:
        self._bar.empty()


def test_label_name(explainer: Explainer, index: int) -> str:
    return str(explainer.class_names[int(explainer.test_labels[int(index)])])


def test_prediction(explainer: Explainer, model_key: str, index: int) -> tuple[str, float]:
    """(predicted label name, its probability) of one model for test image ``index``."""
    probabilities = explainer.test_probabilities(model_key)[int(index)]
    predicted = int(np.argmax(probabilities))
    return str(explainer.class_names[predicted]), float(probabilities[predicted])


def has_chosen_test_image() -> bool:
    """Whether this session picked a test image (on Explain) rather than keeping the default."""
    return _TEST_INDEX in st.session_state


# ------------------------------------------------------------------ groups

#: Kinds offered as choices ("custom" is added by typing indices).
GROUP_KIND_CHOICES: tuple[str, ...] = tuple(k for k in core_groups.GROUP_KINDS if k != "custom")
#: Group sizes offered, as fractions of the training set (Koh et al. 2019: 0.25% to 25%).
GROUP_SIZE_CHOICES: tuple[float, ...] = tuple(core_groups.DEFAULT_SIZES)
#: Defaults light enough for well under a minute on the demo: 12 groups, 12 retrains.
GROUP_DEFAULT_KINDS: tuple[str, ...] = ("random", "helpful", "harmful")
GROUP_DEFAULT_SIZES: tuple[float, ...] = (0.005, 0.025, 0.1)
GROUP_DEFAULT_PER_SIZE = 2
GROUP_ESTIMATES: tuple[str, ...] = tuple(core_groups.GROUP_ESTIMATES)
#: Most indices a user can type for their own group (the text box is bounded too).
MAX_CUSTOM_INDICES = 5000


def size_count(fraction: float, n_train: int) -> int:
    """A group size given as a fraction of the training set, in images."""
    return core_groups.size_count(fraction, n_train)


def parse_indices(text: str) -> tuple[int, ...]:
    """Training indices typed by a user: whole numbers separated by commas or spaces.

    Raises:
        InfluenceExplorerError: with a message saying which entry is not an index.
    """
    tokens = str(text).replace(",", " ").split()
    if len(tokens) > MAX_CUSTOM_INDICES:
        raise InfluenceExplorerError(
            f"Type at most {MAX_CUSTOM_INDICES} training indices for your own group."
        )
    for token in tokens:
        if not (token.isascii() and token.isdigit()):
            shown = "".join(ch if ch.isprintable() and ch != "`" else "?" for ch in token[:20])
            raise InfluenceExplorerError(
                f"{as_code(shown)} is not a training index: type whole numbers separated by "
                "commas, e.g. 3, 17, 250."
            )
    return tuple(int(token) for token in tokens)


def group_config(
    kinds: Sequence[str],
    sizes: Sequence[float],
    groups_per_size: int,
    custom_text: str,
    *,
    seed: int,
    tail_estimate: str,
) -> core_groups.GroupConfig:
    """The groups to form, from the page's widgets.

    Raises:
        InfluenceExplorerError: an index that is not a number, or settings core refuses.
    """
    custom = parse_indices(custom_text)
    return core_groups.GroupConfig(
        kinds=tuple(kinds),
        sizes=tuple(sorted(float(s) for s in sizes)),
        groups_per_size=int(groups_per_size),
        custom=custom or None,
        seed=int(seed),
        tail_estimate=tail_estimate,
    )


def group_count(config: core_groups.GroupConfig, n_train: int) -> int:
    """How many groups (and so retrains) a config makes on ``n_train`` images, before running."""
    return core_groups.count_groups(config, n_train)


@st.cache_data(max_entries=8, show_spinner=False)
def _first_misclassified(engine_key: tuple[Any, ...], _explainer: Explainer) -> int:
    return core_groups.first_misclassified(_explainer)


def default_group_test_index(explainer: Explainer, settings: Settings) -> int:
    """The test image this session picked on Explain, else the first one every model gets wrong
    (on a mistake the explained loss is large and group effects are easy to see)."""
    if has_chosen_test_image():
        return selected_test_index(explainer)
    return _first_misclassified(settings.engine_key, explainer)


@st.cache_data(max_entries=16, show_spinner=False)
def _group_experiment(
    engine_key: tuple[Any, ...],
    model_key: str,
    test_index: int,
    config: core_groups.GroupConfig,
    _explainer: Explainer,
) -> core_groups.GroupExperiment:
    progress = _StageProgress(_explainer.models[model_key].label)
    try:
        return core_groups.explainer_group_experiment(
            _explainer, model_key, config, test_index=test_index, progress=progress
        )
    finally:
        progress.clear()


def _group_key(
    settings: Settings, model_key: str, test_index: int, config: core_groups.GroupConfig
) -> tuple[Any, ...]:
    return (settings.engine_key, model_key, int(test_index), config)


def group_result(
    settings: Settings, model_key: str, test_index: int, config: core_groups.GroupConfig
) -> core_groups.GroupExperiment | None:
    """This session's earlier result for exactly these settings, if any."""
    return _remembered(_GROUP_RESULTS, _group_key(settings, model_key, test_index, config))


def run_group_experiment(
    explainer: Explainer,
    settings: Settings,
    model_key: str,
    test_index: int,
    config: core_groups.GroupConfig,
) -> core_groups.GroupExperiment:
    """Predict (three estimates) and measure (retraining) the effect of removing each group on
    test image ``test_index``'s loss, with a progress bar; remembered for this session.

    Raises:
        InfluenceExplorerError: core refused the settings (e.g. an index out of range).
    """
    result = _group_experiment(settings.engine_key, model_key, int(test_index), config, explainer)
    _remember(_GROUP_RESULTS, _group_key(settings, model_key, test_index, config), result)
    return result


# ------------------------------------------------------------------ data cleaning

RANKINGS: tuple[str, ...] = tuple(core_mislabel.RANKINGS)
#: Fractions of the training set checked at which the labels found are fixed and the model
#: refitted (one refit per ranking and checkpoint); the curve itself costs no refits.
MISLABEL_CHECKPOINT_CHOICES: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
MISLABEL_DEFAULT_CHECKPOINTS: tuple[float, ...] = (0.1, 0.2)
MISLABEL_DEFAULT_FLIP_PERCENT = 10


@st.cache_data(max_entries=16, show_spinner=False)
def _suspicious(
    engine_key: tuple[Any, ...], model_key: str, estimate: str, _explainer: Explainer
) -> tuple[core_mislabel.SuspiciousImage, ...]:
    return core_mislabel.suspicious_training_images(
        _explainer, model_key, k=None, estimate=estimate
    )


def suspicious_images(
    explainer: Explainer, settings: Settings, model_key: str
) -> tuple[core_mislabel.SuspiciousImage, ...]:
    """Every training image of one model, most suspicious first (largest self-influence, with
    the sidebar's estimate)."""
    return _suspicious(settings.engine_key, model_key, settings.estimate, explainer)


@st.cache_data(max_entries=16, show_spinner=False)
def _suspicious_csv(
    engine_key: tuple[Any, ...],
    model_key: str,
    estimate: str,
    _rows: tuple[core_mislabel.SuspiciousImage, ...],
) -> str:
    return core_mislabel.suspicious_csv(_rows)


def suspicious_csv(
    settings: Settings, model_key: str, rows: tuple[core_mislabel.SuspiciousImage, ...]
) -> str:
    """:func:`suspicious_images`' ranking as CSV text (header row, full precision)."""
    return _suspicious_csv(settings.engine_key, model_key, settings.estimate, rows)


def mislabel_config(
    flip_percent: float, checkpoints: Sequence[float], *, seed: int, estimate: str
) -> core_mislabel.MislabelConfig:
    """The flipped-labels experiment, from the page's widgets.

    Raises:
        InfluenceExplorerError: settings core refuses.
    """
    return core_mislabel.MislabelConfig(
        flip_fraction=float(flip_percent) / 100.0,
        seed=int(seed),
        checkpoints=tuple(sorted(float(c) for c in checkpoints)),
        estimate=estimate,
    )


@st.cache_data(max_entries=16, show_spinner=False)
def _mislabel_experiment(
    engine_key: tuple[Any, ...],
    model_key: str,
    config: core_mislabel.MislabelConfig,
    _explainer: Explainer,
) -> core_mislabel.MislabelExperiment:
    progress = _StageProgress(_explainer.models[model_key].label)
    try:
        return core_mislabel.explainer_mislabel_experiment(
            _explainer, model_key, config, progress=progress
        )
    finally:
        progress.clear()


def _mislabel_key(settings: Settings, config: core_mislabel.MislabelConfig) -> tuple[Any, ...]:
    return (settings.engine_key, config)


def mislabel_results(
    settings: Settings, config: core_mislabel.MislabelConfig
) -> dict[str, core_mislabel.MislabelExperiment] | None:
    """This session's earlier results (model key -> experiment) for this config, if any."""
    return _remembered(_MISLABEL_RESULTS, _mislabel_key(settings, config))


def run_mislabel_experiments(
    explainer: Explainer, settings: Settings, config: core_mislabel.MislabelConfig
) -> dict[str, core_mislabel.MislabelExperiment]:
    """Flip labels, refit each model, rank its training images and fix the labels found, with a
    progress bar per model; remembered for this session.

    Raises:
        InfluenceExplorerError: core refused the settings.
    """
    results = {
        key: _mislabel_experiment(settings.engine_key, key, config, explainer)
        for key in MODEL_KEYS
        if key in explainer.models
    }
    _remember(_MISLABEL_RESULTS, _mislabel_key(settings, config), results)
    return results


def found_curve(result: core_mislabel.RankingResult, fractions: Sequence[float]) -> np.ndarray:
    """Fraction of the flipped labels found after checking each fraction of the training set."""
    return core_mislabel.curve_points(result, fractions)


# ------------------------------------------------------------------ attack

ATTACK_DEFAULTS = core_attack.AttackConfig()


def attack_config(
    budget: int, step_size: int, steps: int, n_perturb: int, retrain_every_step: bool
) -> core_attack.AttackConfig:
    """The attack's settings, from the page's widgets.

    Raises:
        InfluenceExplorerError: settings core refuses.
    """
    return core_attack.AttackConfig(
        budget=int(budget),
        step_size=int(step_size),
        steps=int(steps),
        n_perturb=int(n_perturb),
        retrain_every_step=bool(retrain_every_step),
    )


@st.cache_data(max_entries=16, show_spinner=False)
def _attack(
    engine_key: tuple[Any, ...],
    model_key: str,
    test_index: int,
    config: core_attack.AttackConfig,
    _explainer: Explainer,
) -> core_attack.AttackResult:
    progress = _StageProgress(_explainer.models[model_key].label)
    try:
        return core_attack.explainer_attack(
            _explainer,
            model_key,
            test_index,
            config,
            progress=lambda done, total: progress("perturbing and retraining, step", done, total),
        )
    finally:
        progress.clear()


def _attack_key(
    settings: Settings, model_key: str, test_index: int, config: core_attack.AttackConfig
) -> tuple[Any, ...]:
    return (settings.engine_key, model_key, int(test_index), config)


def attack_result(
    settings: Settings, model_key: str, test_index: int, config: core_attack.AttackConfig
) -> core_attack.AttackResult | None:
    """This session's earlier attack with exactly these settings, if any."""
    return _remembered(_ATTACK_RESULTS, _attack_key(settings, model_key, test_index, config))


def run_attack(
    explainer: Explainer,
    settings: Settings,
    model_key: str,
    test_index: int,
    config: core_attack.AttackConfig,
) -> core_attack.AttackResult:
    """Perturb the test image's most helpful training image(s) within the budget, retraining
    after each step, with a progress bar; remembered for this session.

    Raises:
        InfluenceExplorerError: core refused the settings.
    """
    result = _attack(settings.engine_key, model_key, int(test_index), config, explainer)
    _remember(_ATTACK_RESULTS, _attack_key(settings, model_key, test_index, config), result)
    return result


@st.cache_data(max_entries=8, show_spinner=False)
def _correctly_classified(
    engine_key: tuple[Any, ...], count: int, _explainer: Explainer
) -> list[int]:
    return core_attack.correctly_classified(_explainer, count=count, seed=0)


def attack_suggestions(explainer: Explainer, settings: Settings, count: int = 8) -> list[int]:
    """Up to ``count`` test images every model classifies correctly (seeded): the images Koh &
    Liang attack, where a flip makes a right prediction wrong."""
    return _correctly_classified(settings.engine_key, int(count), explainer)


def amplified_difference(result: core_attack.AttackResult) -> np.ndarray:
    """(k, H, W, C) uint8: the perturbations made visible, grey = unchanged, ±budget = black/white."""
    return core_attack.amplified_difference(result)
