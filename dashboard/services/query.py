"""What this session is explaining: a test image or its upload, the training image being inspected,
and the gallery of test images to pick from.

All of it is per-session state: one user's selection or upload never reaches another's session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import streamlit as st

from core.explainer import Explainer
from dashboard.services.facts import class_names, n_test, n_train, test_image, test_predictions
from dashboard.services.notices import mark_pending, notice, pending, settle
from dashboard.services.uploads import (
    Upload,
    as_code,
    decode_uploaded_file,
    is_upload_id,
    keep_upload,
    kept_upload,
)

# Session-state keys owned by this module.
_TEST_INDEX = "state_test_index"
_SOURCE = "state_source"
_UPLOAD = "state_upload"
_UPLOAD_ERROR = "state_upload_error"
_UPLOAD_FILE_ID = "state_upload_file_id"
_INSPECT = "state_inspect"
_UPLOAD_KEPT = "state_upload_kept"


# --------------------------------------------------------------------------- uploads


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
    # Kept by content so that a link to it works for whoever has the link.
    st.session_state[_UPLOAD_KEPT] = keep_upload(outcome.upload)


def upload_kept() -> bool:
    """Whether this session's upload is kept on the server (else a link to it works only here)."""
    return bool(st.session_state.get(_UPLOAD_KEPT, True))


def upload_error() -> str | None:
    """Why this session's last upload could not be used, until the next one."""
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
        """The query as the engine's ``explain``/``heatmap``/``verify`` take it."""
        if self.upload is not None:
            return {"image": self.upload.image}
        return {"test_index": self.test_index}


def selected_test_index(explainer: Explainer) -> int:
    """The test image this session picked (0 before any pick), within this explainer's range.

    A link's test index is checked here, once the number of test images is known: one out of
    range gets a notice and test image #0.
    """
    index = int(st.session_state.get(_TEST_INDEX, 0) or 0)
    count = n_test(explainer)
    asked = pending(_TEST_INDEX)
    if asked is not None:
        settle(_TEST_INDEX)
        if not 0 <= index < count:
            notice(
                f"The link asks for test image #{asked}, but these classes have {count} test "
                "images (#0 to #" + f"{count - 1}); showing test image #0."
            )
            st.session_state[_TEST_INDEX] = 0
            return 0
    return min(max(index, 0), count - 1)


def open_linked_test_image(index: int, shown: str) -> None:
    """A link's test image: explain it (checked against the test set by
    :func:`selected_test_index`)."""
    select_test_image(index)
    mark_pending(_TEST_INDEX, shown)


def open_linked_upload(digest: str) -> bool:
    """A link's upload: explain it if this server keeps it; else a notice and False."""
    upload = kept_upload(digest) if is_upload_id(digest) else None
    if upload is None:
        what = f"upload {digest[:12]}…" if is_upload_id(digest) else "upload"
        reason = (
            "is not kept on this server (uploads are kept in the server's cache, which may have "
            "been cleared, or the link comes from another server)"
            if is_upload_id(digest)
            else "id is not valid (64 hexadecimal digits expected)"
        )
        notice(f"The link's {what} {reason}; showing a test image instead. Upload the image again.")
        return False
    st.session_state[_UPLOAD] = upload
    st.session_state[_SOURCE] = "upload"
    st.session_state[_INSPECT] = None
    st.session_state[_UPLOAD_KEPT] = True
    mark_pending(_UPLOAD, digest)
    return True


def has_chosen_test_image() -> bool:
    """Whether this session picked a test image (on Explain) rather than keeping the default."""
    return _TEST_INDEX in st.session_state


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
    if pending(_UPLOAD) is not None:
        settle(_UPLOAD)
        if current_upload(explainer) is None and st.session_state.get(_SOURCE) == "upload":
            upload = st.session_state.get(_UPLOAD)
            shape = upload.image_format[0] if isinstance(upload, Upload) else "?"
            notice(
                "The link's upload was converted for another image format "
                f"({'×'.join(str(v) for v in shape)}) than these models read "
                f"({facts_shape(explainer)}); showing a test image. Open the link with its own "
                "dataset, or upload the image again."
            )
            st.session_state[_SOURCE] = "test"
    upload = current_upload(explainer)
    if upload is not None and st.session_state.get(_SOURCE) == "upload":
        return Query(
            key=f"upload:{upload.digest}",
            test_index=None,
            upload=upload,
            image=upload.image,
            title=f"Uploaded {as_code(short_name(upload.name))}",
        )
    index = selected_test_index(explainer)
    return Query(
        key=f"test:{index}",
        test_index=index,
        upload=None,
        image=test_image(explainer, index),
        title=f"Test image #{index}",
    )


# --------------------------------------------------------------------------- inspecting


@dataclass(frozen=True)
class Inspected:
    """The training image whose per-pixel influence is shown, and for which model."""

    model_key: str
    train_index: int


def inspect(model_key: str, train_index: int, query_key: str) -> None:
    """Callback: show the heatmap view of one training image for one model."""
    st.session_state[_INSPECT] = (model_key, int(train_index), query_key)


def close_inspector() -> None:
    st.session_state[_INSPECT] = None


def inspected(
    query: Query, explainer: Explainer | None = None, *, later: tuple[str, ...] = ()
) -> Inspected | None:
    """The training image being inspected for this query, if any.

    A link's inspected image is checked here against ``explainer``'s models and training set.
    ``later``: models still being prepared (the Explain page's first look); an inspection of
    one of them waits for it, unchecked and not shown.
    """
    value = st.session_state.get(_INSPECT)
    if value and value[0] in later:
        return None
    asked = pending(_INSPECT)
    if asked is not None and explainer is not None:
        settle(_INSPECT)
        if value and (value[0] not in explainer.models or not 0 <= value[1] < n_train(explainer)):
            notice(
                f"The link asks to inspect {asked}, which these models do not have (models: "
                f"{', '.join(explainer.models)}; training images #0 to "
                f"#{n_train(explainer) - 1}); the heatmap is not shown."
            )
            st.session_state[_INSPECT] = None
            return None
    if not value or value[2] != query.key:
        return None
    return Inspected(value[0], value[1])


def inspected_text() -> str | None:
    """The inspected image as a link writes it, "<model>:<train index>", if any."""
    value = st.session_state.get(_INSPECT)
    return f"{value[0]}:{value[1]}" if value else None


def open_linked_inspection(model_key: str, train_index: int, shown: str) -> None:
    """A link's inspected training image, for the query the link also opened."""
    source = st.session_state.get(_SOURCE, "test")
    upload = st.session_state.get(_UPLOAD)
    if source == "upload" and isinstance(upload, Upload):
        key = f"upload:{upload.digest}"
    else:
        key = f"test:{int(st.session_state.get(_TEST_INDEX, 0) or 0)}"
    st.session_state[_INSPECT] = (model_key, int(train_index), key)
    mark_pending(_INSPECT, shown)


def query_link(explainer: Explainer | None = None) -> dict[str, str]:
    """The session's query as link parameters: {"test": "49"} or {"upload": "<sha256>"}."""
    upload = st.session_state.get(_UPLOAD)
    chosen = st.session_state.get(_SOURCE) == "upload" and isinstance(upload, Upload)
    if chosen and (explainer is None or current_upload(explainer) is not None):
        return {"upload": upload.digest}
    index = int(st.session_state.get(_TEST_INDEX, 0) or 0)
    if explainer is not None:
        index = min(max(index, 0), n_test(explainer) - 1)
    return {"test": str(index)}


def short_name(name: str, limit: int = 28) -> str:
    """A file name shortened in the middle to at most ``limit`` characters, keeping its end (the
    suffix), so a title never has to break inside it:
    "my_summer_holiday_photo_of_a_cat_2024.jpg" -> "my_summer_holi…_cat_2024.jpg"."""
    if len(name) <= limit:
        return name
    tail = max(4, (limit - 1) // 2)
    return name[: limit - 1 - tail] + "…" + name[-tail:]


def facts_shape(explainer: Explainer) -> str:
    return "×".join(str(v) for v in explainer.dataset.image_shape)


# --------------------------------------------------------------------------- the gallery


@dataclass(frozen=True)
class Gallery:
    """Test images with every model's predictions, for the picker.

    Attributes:
        indices: (m,) test rows passing the filter.
        true_labels: (n_test,) class indices.
        predictions: model key -> (n_test,) its predicted class indices, in the engine's order.
        class_names: label names.
    """

    indices: np.ndarray
    true_labels: np.ndarray
    predictions: dict[str, np.ndarray]
    class_names: tuple[str, ...]


GALLERY_FILTERS = {
    "all": "All",
    "misclassified": "Misclassified by any model",
    "disagree": "Models disagree",
}


def gallery(explainer: Explainer, which: str) -> Gallery:
    """The test images passing filter ``which`` (a key of :data:`GALLERY_FILTERS`)."""
    true = np.asarray(explainer.test_labels)
    predictions = test_predictions(explainer)
    stacked = np.stack(list(predictions.values()))  # (models, n_test)
    if which == "misclassified":
        mask = (stacked != true).any(axis=0)
    elif which == "disagree":
        mask = (stacked != stacked[0]).any(axis=0)
    else:
        mask = np.ones(len(true), dtype=bool)
    return Gallery(np.flatnonzero(mask), true, predictions, class_names(explainer))
