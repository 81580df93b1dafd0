"""The Explain page's first look: from a cache without backbone features, the RBF SVM is shown
while the logistic regression's features are computed, and the page completes by itself.

The backbone is replaced by a cheap fixed projection that waits for the test's go-ahead, so the
test controls when the features are "done" (a real EfficientNet pass over the demo pair takes
about 20 s on two cores).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from core.features import EfficientNetLite0Featurizer
from core.store import ENV_CACHE_DIR
from dashboard.services import engines, first_look
from dashboard.services.settings import Settings, load_dataset
from tests.dashboard.conftest import APP, RUN_TIMEOUT


def _keys(at: AppTest, prefix: str) -> list[str]:
    return [b.key for b in at.button if b.key and b.key.startswith(prefix)]


def test_the_svm_is_explained_while_the_backbone_features_are_computed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "empty-cache"))
    go = threading.Event()
    calls: list[int] = []
    projection = np.random.default_rng(0).standard_normal((784, 1280)) / 28.0

    def held_back(self, images, *args, **kwargs):
        calls.append(len(images))
        assert go.wait(120), "the test never let the features finish"
        flat = np.asarray(images, dtype=np.float64).reshape(len(images), -1) / 255.0
        return np.maximum(flat @ projection, 0.0).astype(np.float32)

    monkeypatch.setattr(EfficientNetLite0Featurizer, "transform", held_back)
    at = AppTest.from_file(str(APP), default_timeout=RUN_TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    # The SVM's lists are there; the logistic regression is a progress bar in its place.
    assert len(_keys(at, "explain_inspect_svm_helpful_")) == 10
    assert not _keys(at, "explain_inspect_logreg_")
    subheaders = [s.value for s in at.subheader]
    assert any(s.startswith("Logistic regression on") for s in subheaders), subheaders
    captions = " ".join(c.value for c in at.caption)
    assert "Being prepared in the background" in captions
    assert "Downloads and the check by retraining open once every model is ready" in captions
    assert not _keys(at, "explain_run_check_")  # no check on half the models
    assert not _keys(at, "explain_download_")
    # The full preparation is running, behind the first look (never beside it).
    full = engines.preparations().peek(Settings().engine)
    assert full is not None and not full.finished
    deadline = time.monotonic() + 60
    while not calls and time.monotonic() < deadline:
        time.sleep(0.1)
    assert calls, "the full preparation never asked for backbone features"

    look_engine = first_look.first_look_engine(Settings().engine)
    look = engines.preparations().peek(look_engine)
    assert look is not None and look.finished
    go.set()
    assert full.wait(RUN_TIMEOUT), "the full preparation did not finish"
    assert full.error is None, repr(full.error)
    at.run()
    assert not at.exception and not at.error
    for model in ("svm", "logreg"):
        assert len(_keys(at, f"explain_inspect_{model}_helpful_")) == 10
    assert "Being prepared in the background" not in " ".join(c.value for c in at.caption)
    assert _keys(at, "explain_run_check_")
    # Both explainers rank the SVM's training images alike (the full one reads the first
    # look's fitted parameters from the cache and refits to tolerance).
    assert look.result is not None and full.result is not None
    assert engines.preparations().peek(look_engine) is None  # dropped once the full one is in
    np.testing.assert_allclose(
        look.result.explain(test_index=0).models["svm"].scores,
        full.result.explain(test_index=0).models["svm"].scores,
        rtol=1e-6,
        atol=1e-12,
    )


def test_no_first_look_when_the_features_are_cached(make_app) -> None:
    at = make_app().run()
    assert not at.exception and not at.error
    assert engines.preparations().peek(first_look.first_look_engine(Settings().engine)) is None
    assert _keys(at, "explain_inspect_logreg_helpful_")


def test_a_cancelled_first_look_says_so_and_offers_to_start_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty cache: the page would take a first look; its preparation is cancelled at its
    # first report (the Cancel button under "Preparing a first look" does job.cancel()).
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "empty-cache"))
    settings = Settings()
    look_engine = first_look.first_look_engine(settings.engine)
    assert look_engine is not None
    dataset = load_dataset(settings.dataset, settings.image_size)
    look = engines.preparations().get(
        look_engine, lambda: engines.start_preparation(look_engine, dataset)
    )
    look.cancel()
    assert look.wait(RUN_TIMEOUT) and look.cancelled
    at = AppTest.from_file(str(APP), default_timeout=RUN_TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("cancelled" in i.value for i in at.info), [i.value for i in at.info]
    # Dropped, and nothing started again until the user presses Prepare.
    assert engines.preparations().peek(look_engine) is None
    assert engines.preparations().peek(settings.engine) is None
    assert at.button(key="state_prepare_confirm")
    assert not _keys(at, "explain_inspect_")
    at.button(key="state_prepare_confirm").click().run()
    assert not at.exception, [e.value for e in at.exception]
    started = engines.preparations().peek(look_engine) or engines.preparations().peek(
        settings.engine
    )
    assert started is not None, "Prepare starts the preparation again"
    # Stopped again here: a preparation thread still running when the test process exits
    # aborts it.
    for engine in (look_engine, settings.engine):
        job = engines.preparations().peek(engine)
        if job is not None:
            job.cancel()
            assert job.wait(RUN_TIMEOUT)
