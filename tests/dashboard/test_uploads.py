"""Uploads: every hostile or awkward file gives an image or a clear message, never an exception;
an upload stays in its own session."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from core.images import DEFAULT_MAX_BYTES
from dashboard.services import uploads
from tests.dashboard.conftest import RUN_TIMEOUT
from tests.hostile_files import float_tiff, jpeg_cut_short, jpeg_scan_bomb
from tests.prepared_cache import REPO
from tests.upload_corpus import UploadCase, build_upload_corpus

CORPUS = build_upload_corpus()


@pytest.fixture(params=CORPUS, ids=[case.name for case in CORPUS])
def upload_case(request: pytest.FixtureRequest) -> UploadCase:
    return request.param


def test_every_corpus_file_gives_an_image_or_a_message(upload_case: UploadCase) -> None:
    outcome = uploads.decode_uploaded_file(
        upload_case.filename,
        upload_case.data,
        image_shape=upload_case.target_shape,
        light_on_dark=upload_case.light_on_dark,
    )
    if upload_case.expect == "error":
        assert outcome.upload is None
        assert outcome.error and f"`{upload_case.filename}` could not be used" in outcome.error
        if upload_case.message_contains:
            assert upload_case.message_contains in outcome.error.lower()
    else:
        assert outcome.error is None and outcome.upload is not None
        upload = outcome.upload
        assert upload.image.shape == upload_case.target_shape
        assert upload.image.dtype == np.uint8
        assert upload.image_format == (upload_case.target_shape, upload_case.light_on_dark)
        assert len(upload.digest) == 64


def test_a_file_object_is_read_from_the_start() -> None:
    case = next(c for c in CORPUS if c.name == "grayscale_png")
    stream = io.BytesIO(case.data)
    stream.seek(10)
    outcome = uploads.decode_uploaded_file(
        case.filename, stream, image_shape=case.target_shape, light_on_dark=case.light_on_dark
    )
    assert outcome.upload is not None


class _CountingStream(io.RawIOBase):
    """An endless stream that counts what is read from it."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise AssertionError("an upload must be read with a bound")
        self.read_bytes += size
        return b"\x89PNG" + b"\0" * (size - 4)


def test_an_oversized_stream_is_refused_without_reading_it_all() -> None:
    stream = _CountingStream()
    outcome = uploads.decode_uploaded_file(
        "huge.png", stream, image_shape=(28, 28, 1), light_on_dark=True
    )
    assert outcome.upload is None and "limit" in (outcome.error or "")
    assert stream.read_bytes <= DEFAULT_MAX_BYTES + 1


def test_the_file_name_is_shown_not_trusted() -> None:
    outcome = uploads.decode_uploaded_file(
        "../../etc/pass\x00wd.png", b"", image_shape=(28, 28, 1), light_on_dark=True
    )
    assert outcome.error is not None
    assert outcome.error.startswith("`pass?wd.png` could not be used")


def test_a_file_name_cannot_inject_markdown() -> None:
    outcome = uploads.decode_uploaded_file(
        "[click](https:evil)`$x$`.png", b"", image_shape=(28, 28, 1), light_on_dark=True
    )
    assert outcome.error is not None
    assert outcome.error.startswith("`[click](https:evil)?$x$?.png` could not be used")


def test_the_image_widget_takes_what_the_decoder_takes() -> None:
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert uploads.MAX_UPLOAD_MB * 2**20 == DEFAULT_MAX_BYTES
    assert config["server"]["maxUploadSize"] * 2**20 >= DEFAULT_MAX_BYTES
    assert config["server"]["enableXsrfProtection"] is True
    assert config["server"]["enableCORS"] is True
    assert config["browser"]["gatherUsageStats"] is False


def _upload_script(filename: str, data: bytes) -> None:
    """An app that hands one file to the upload handler, as the Explain page does."""
    import io

    import streamlit as st

    from dashboard.services import engines, query

    class FakeUploadedFile(io.BytesIO):
        def __init__(self, name: str, payload: bytes) -> None:
            super().__init__(payload)
            self.name = name
            self.file_id = f"{name}-{len(payload)}"

    explainer = engines.require_explainer()
    query.accept_upload(FakeUploadedFile(filename, data), explainer)
    if query.upload_error():
        st.error(query.upload_error())
    st.markdown(query.current_query(explainer).key)


def _case(name: str) -> UploadCase:
    return next(c for c in CORPUS if c.name == name)


def test_a_bad_upload_shows_a_message_and_keeps_the_query(prepared_cache: Path) -> None:
    case = _case("truncated_png")
    at = AppTest.from_function(
        _upload_script, args=(case.filename, case.data), default_timeout=RUN_TIMEOUT
    ).run()
    assert not at.exception
    assert len(at.error) == 1 and f"`{case.filename}`" in at.error[0].value
    assert at.markdown[-1].value == "test:0"


def test_a_good_upload_becomes_the_query(prepared_cache: Path) -> None:
    case = _case("grayscale_png")
    at = AppTest.from_function(
        _upload_script, args=(case.filename, case.data), default_timeout=RUN_TIMEOUT
    ).run()
    assert not at.exception and not at.error
    assert at.markdown[-1].value.startswith("upload:")


def test_an_upload_is_explained_on_every_page_and_stays_in_its_session(
    make_app: Callable[[], AppTest],
) -> None:
    case = _case("grayscale_png")
    outcome = uploads.decode_uploaded_file(
        case.filename, case.data, image_shape=(28, 28, 1), light_on_dark=True
    )
    mine, theirs = make_app(), make_app()
    mine.session_state["state_upload"] = outcome.upload
    mine.session_state["state_source"] = "upload"
    mine.run()
    assert not mine.exception and not mine.error
    subheaders = [s.value for s in mine.subheader]
    assert f"Uploaded `{case.filename}`" in subheaders
    assert any("of its own prediction" in i.value for i in mine.info)
    buttons = [b.key for b in mine.button if b.key and b.key.startswith("explain_inspect_")]
    assert len(buttons) >= 20  # helpful and harmful lists for both models (k = 10)
    for script in ("app_pages/compare.py", "app_pages/verify.py"):
        mine.switch_page(script).run()
        assert not mine.exception
        assert f"Uploaded `{case.filename}`" in [s.value for s in mine.subheader]

    theirs.run()
    assert not theirs.exception
    assert "Test image #0" in [s.value for s in theirs.subheader]
    assert theirs.session_state["state_settings"] == mine.session_state["state_settings"]
    assert "state_upload" not in theirs.session_state


# ---------------------------------------------------------------- the corpus on the real page


class _PickedFile(io.BytesIO):
    """What st.file_uploader returns for a picked file (name, file_id, a binary stream)."""

    def __init__(self, name: str, payload: bytes) -> None:
        super().__init__(payload)
        self.name = name
        self.file_id = f"{name}:{len(payload)}"


def test_every_corpus_upload_on_the_explain_page(
    make_app: Callable[[], AppTest], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real Explain page, one session, the upload widget answering with each corpus file in
    turn: an explanation of it, or one clear message with the last good query still explained;
    after each, a normal action works. (AppTest cannot drive a file_uploader; the browser tests
    upload for real.)"""
    import streamlit as st

    picked: list[_PickedFile] = []
    monkeypatch.setattr(st, "file_uploader", lambda *args, **kwargs: picked[-1])
    at = make_app()
    failures = []
    for number, case in enumerate(CORPUS):
        picked.append(_PickedFile(case.filename, case.data))
        at.run()
        problem = _corpus_outcome_problem(at, case)
        if problem is None:
            # A normal action afterwards: pick a test image, which becomes the query.
            index = number % 12  # on the gallery's first page (two rows of six)
            at.button(key=f"explain_pick_{index}").click().run()
            if at.exception or at.main.error:
                problem = "picking a test image afterwards failed"
            elif f"Test image #{index}" not in [s.value for s in at.subheader]:
                problem = "picking a test image afterwards did not select it"
        if problem is not None:
            failures.append(f"{case.name}: {problem}")
    assert not failures, "\n".join(failures)


def _corpus_outcome_problem(at: AppTest, case: UploadCase) -> str | None:
    if at.exception:
        return f"exception {[e.value for e in at.exception]}"
    subheaders = [s.value for s in at.subheader]
    errors = [e.value for e in at.main.error]
    inspect = [b.key for b in at.button if b.key and b.key.startswith("explain_inspect_")]
    if not (
        any(key.startswith("explain_inspect_svm_") for key in inspect)
        and any(key.startswith("explain_inspect_logreg_") for key in inspect)
    ):
        return "the page shows no explanation"
    if case.expect == "ok":
        if errors:
            return f"unexpected error {errors}"
        if f"Uploaded `{case.filename}`" not in subheaders:
            return f"not explained as the upload (headings {subheaders})"
        return None
    if len(errors) != 1 or not errors[0].startswith(f"`{case.filename}` could not be used: "):
        return f"expected one message naming the file, got {errors}"
    if case.message_contains and case.message_contains not in errors[0].lower():
        return f"message lacks {case.message_contains!r}: {errors[0]}"
    if not any(h.startswith(("Test image #", "Uploaded `")) for h in subheaders):
        return "the previous query is no longer shown"
    return None


@pytest.mark.parametrize(
    ("filename", "data", "expected"),
    [
        ("bomb.jpg", jpeg_scan_bomb(scans=2_000), "more than 100 scans"),
        ("cut.jpg", jpeg_cut_short(0.5), "ends before the image does"),
        ("nan.tif", float_tiff(np.full((16, 16), np.nan)), "nan or infinite pixel values"),
    ],
    ids=["scan_bomb", "cut_short_jpeg", "all_nan_tiff"],
)
def test_hostile_uploads_get_a_message_at_once(filename: str, data: bytes, expected: str) -> None:
    # The 186 KB scan bomb took 11 s of CPU and was then shown as a grey image.
    started = time.monotonic()
    outcome = uploads.decode_uploaded_file(
        filename, data, image_shape=(28, 28, 1), light_on_dark=True
    )
    assert outcome.upload is None
    assert outcome.error and expected in outcome.error.lower(), outcome.error
    assert time.monotonic() - started < 5
