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
from core.images import DEFAULT_MAX_BYTES, SUPPORTED_EXTENSIONS, decode_upload
from core.influence import ESTIMATES, SolverConfig
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

ESTIMATE_LABELS = {"corrected": "Newton-corrected", "first_order": "First order (paper)"}
SOLVER_LABELS = {"exact": "Exact (Cholesky)", "cg": "Conjugate gradients", "lissa": "LiSSA"}
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


# --------------------------------------------------------------------------- method


def summaries(explainer: Explainer) -> dict[str, Any]:
    return explainer.summaries()


ESTIMATE_NAMES: tuple[str, ...] = ESTIMATES
