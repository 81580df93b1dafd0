"""Numerical faults in the dashboard: each shows a message that names the fix in the sidebar, the
page never shows a traceback, and once the fix is applied (or the fault is gone) it works again.

The faults are injected where they would arise in core (an indefinite Hessian, a LiSSA too
short to converge, NaN features, NaN scores); everything between them and the page is real.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

import core.influence
from core import explainer as explainer_module
from core.features import EfficientNetLite0Featurizer
from core.influence import InfluenceEngine, SolverConfig
from core.models import LogisticRegression
from dashboard.services import settings, uploads

Factory = Callable[[], AppTest]


def _inspect_buttons(at: AppTest, model: str) -> list[str]:
    prefix = f"explain_inspect_{model}_"
    return [b.key for b in at.button if b.key and b.key.startswith(prefix)]


def _explained(at: AppTest) -> bool:
    return bool(_inspect_buttons(at, "svm")) and bool(_inspect_buttons(at, "logreg"))


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.main.error]


def test_a_hessian_that_is_not_positive_definite_names_the_damping_that_fixes_it(
    make_app: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = LogisticRegression.hessian

    def indefinite(self):
        # An eigenvalue of -1e-3 (the features are 1280-d and the images 1000, so the smallest
        # eigenvalue of the real Hessian is the weight decay itself).
        hessian = real(self)
        hessian.diagonal().sub_(self.l2 + 1e-3)
        return hessian

    monkeypatch.setattr(LogisticRegression, "hessian", indefinite)
    # The exact solver would otherwise take the dual form here (1000 images < 1280 features),
    # which never forms H; an indefinite Hessian is the primal form's case.
    monkeypatch.setattr(
        core.influence, "_dual_refusal", lambda model, damping: "an indefinite Hessian (test)"
    )
    at = make_app().run()
    assert not at.exception
    (message,) = _errors(at)
    assert "not positive definite" in message
    assert "set *Damping* to 0.01 or more in the sidebar under *Advanced*" in message
    assert at.button(key="state_retry_preparation")
    assert not _explained(at)

    # The fix, as the message says: the page works.
    at.select_slider(key="side_damping").set_value(0.01).run()
    assert not at.exception and not _errors(at)
    assert _explained(at)


# The same message also goes to the server log as a Python warning.
@pytest.mark.filterwarnings("ignore::core.influence.LiSSAWarning")
def test_lissa_that_cannot_have_converged_says_so_on_the_page(
    make_app: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short recursion keeps preparation quick; at the default depth the warning is the same.
    monkeypatch.setattr(settings, "SolverConfig", partial(SolverConfig, lissa_depth=20))
    at = make_app().run()
    at.selectbox(key="side_solver").set_value("lissa").run()
    assert not at.exception and not _errors(at)
    warnings = [w.value for w in at.main.warning]
    assert len(warnings) == 2, warnings  # one per model, each naming it
    assert warnings[0].startswith("RBF SVM on pixels: LiSSA")
    assert warnings[1].startswith("Logistic regression on")
    for warning in warnings:
        assert "cannot have converged" in warning
        assert "choose *Exact (Cholesky)* as the solver" in warning
    assert _explained(at)  # the scores are shown, with the caveat

    at.switch_page("app_pages/verify.py").run()
    assert not at.exception
    assert len(at.main.warning) == 2  # every page that uses the engine says it


def test_nan_features_are_refused_with_advice(
    make_app: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = explainer_module.cached_features

    def poisoned(*args, **kwargs):
        features = real(*args, **kwargs).copy()
        features[1, 3] = np.nan
        return features

    monkeypatch.setattr(explainer_module, "cached_features", poisoned)
    at = make_app().run()
    assert not at.exception
    (message,) = _errors(at)
    assert "NaN or infinite features" in message
    assert "choose another backbone in the sidebar" in message

    monkeypatch.undo()  # e.g. the weights were replaced: "Try again" rebuilds
    at.button(key="state_retry_preparation").click().run()
    assert not at.exception and not _errors(at)
    assert _explained(at)


def test_non_finite_features_of_an_upload_are_refused_and_the_app_keeps_serving(
    make_app: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = make_app().run()
    assert _explained(at)
    image = np.full((28, 28, 1), 30, dtype=np.uint8)
    image[6:22, 8:20] = 200
    outcome = uploads.decode_uploaded_file(
        "odd.png", _png(image), image_shape=(28, 28, 1), light_on_dark=True
    )
    assert outcome.upload is not None
    real = EfficientNetLite0Featurizer.transform

    def infinite_for_one_image(self, images, **kwargs):
        features = real(self, images, **kwargs)
        return np.full_like(features, np.inf) if len(images) == 1 else features

    monkeypatch.setattr(EfficientNetLite0Featurizer, "transform", infinite_for_one_image)
    at.session_state["state_upload"] = outcome.upload
    at.session_state["state_source"] = "upload"
    at.run()
    assert not at.exception
    (message,) = _errors(at)
    assert "the uploaded image" in message and "choose another backbone" in message

    # A normal action afterwards works.
    at.button(key="explain_pick_4").click().run()
    assert not at.exception and not _errors(at)
    assert any(s.value == "Test image #4" for s in at.subheader)
    assert _explained(at)


def test_nan_scores_are_refused_not_listed_and_the_app_recovers(
    make_app: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = InfluenceEngine.influence_scores

    def nan_scores(self, *args, **kwargs):
        scores = real(self, *args, **kwargs)
        scores[:, :5] = np.nan
        return scores

    monkeypatch.setattr(InfluenceEngine, "influence_scores", nan_scores)
    at = make_app().run()
    assert not at.exception
    (message,) = _errors(at)
    assert "NaN or infinite" in message
    assert "choose a larger *Damping*" in message  # the exact solver is already chosen
    assert not _explained(at)

    monkeypatch.undo()
    at.button(key="explain_pick_2").click().run()
    assert not at.exception and not _errors(at)
    assert _explained(at)


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, "PNG")
    return buffer.getvalue()
