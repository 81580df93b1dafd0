"""AppTest: the Training data pages (Groups, Data cleaning, Attack) run their experiments with small
settings, show the results, remember them for the session, and show core's domain errors."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from core.errors import InfluenceExplorerError, NotPositiveDefiniteError
from core.groups import first_misclassified
from dashboard.services import engines, uploads
from tests.upload_corpus import build_upload_corpus

Factory = Callable[[], AppTest]

GROUPS = "app_pages/groups.py"
CLEANING = "app_pages/cleaning.py"
ATTACK = "app_pages/attack.py"


def _no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _charts(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def _metrics(at: AppTest) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for metric in at.metric:
        out.setdefault(metric.label, []).append(metric.value)
    return out


def _frame(at: AppTest, column: str) -> pd.DataFrame:
    """The one table with this column (non-selectable tables carry no key in AppTest)."""
    frames = [frame.value for frame in at.dataframe if column in frame.value.columns]
    assert len(frames) == 1, f"{len(frames)} tables with a column {column!r}"
    return frames[0]


def _failing(*args: object, **kwargs: object) -> None:
    raise InfluenceExplorerError("The solver gave up: try the exact solver.")


def _not_positive_definite(*args: object, **kwargs: object) -> None:
    raise NotPositiveDefiniteError("The Hessian is not positive definite.", suggested_damping=5e-3)


def test_groups_default_image_run_remember_and_a_domain_error(make_app: Factory) -> None:
    at = make_app().run()
    at.switch_page(GROUPS).run()
    _no_errors(at)
    # No image picked on Explain: the first test image every model gets wrong.
    default = int(at.number_input(key="groups_test_index").value)
    explainer = engines.explainer_if_ready(at.session_state["state_settings"])
    assert explainer is not None
    assert default == first_misclassified(explainer.models.values(), explainer.test_labels)
    assert _charts(at) == 0

    at.radio(key="groups_model").set_value("svm")
    at.pills(key="groups_kinds").set_value(["random", "helpful"])
    at.pills(key="groups_sizes").set_value([0.005, 0.025])
    at.number_input(key="groups_per_size").set_value(1).run()
    assert any(c.value.startswith("4 groups, so 4 retrains") for c in at.caption)
    at.button(key="groups_run").click().run()
    _no_errors(at)
    assert _charts(at) == 2  # predicted vs actual, and the under-estimation by size
    metrics = _metrics(at)
    assert len(metrics["Spearman"]) == len(metrics["Pearson"]) == len(metrics["Slope"]) == 3
    groups = _frame(at, "actual")
    assert len(groups) == 4
    assert {"First order", "Second order (Basu et al.)", "Newton-corrected", "actual"} <= set(
        groups.columns
    )
    assert groups["actual"].notna().all()
    trend = _frame(at, "group size (images)")
    assert list(trend["group size (images)"]) == [5, 25]

    # Remembered for the session: shown again after a visit elsewhere, without a click.
    at.switch_page("app_pages/explain.py").run()
    at.switch_page(GROUPS).run()
    _no_errors(at)
    assert int(at.number_input(key="groups_test_index").value) == default
    assert _charts(at) == 2
    assert at.button(key="groups_run").label == "Run again"

    # A group core refuses: the message, no traceback, the page still works.
    at.text_input(key="groups_custom").input("3, 5000").run()
    at.button(key="groups_run").click().run()
    assert not at.exception
    assert any("must be in [0, 1000)" in e.value for e in at.error)
    at.text_input(key="groups_custom").input("3, seven").run()
    assert any("`seven` is not a training index" in e.value for e in at.error)
    assert at.button(key="groups_run").disabled


def test_groups_and_attack_start_from_the_image_picked_on_explain(make_app: Factory) -> None:
    at = make_app().run()
    at.button(key="explain_pick_3").click().run()
    # Then an upload is explained: these pages need a labelled test image and keep #3.
    case = next(c for c in build_upload_corpus() if c.name == "grayscale_png")
    outcome = uploads.decode_uploaded_file(
        case.filename, case.data, image_shape=(28, 28, 1), light_on_dark=True
    )
    at.session_state["state_upload"] = outcome.upload
    at.session_state["state_source"] = "upload"
    for page, key in ((GROUPS, "groups_test_index"), (ATTACK, "attack_test_index")):
        at.switch_page(page).run()
        _no_errors(at)
        assert int(at.number_input(key=key).value) == 3
        assert any("Explain is showing your upload" in c.value for c in at.caption)


def test_data_cleaning_lists_runs_and_shows_a_domain_error(
    make_app: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = make_app().run()
    at.switch_page(CLEANING).run()
    _no_errors(at)
    listed = _frame(at, "self-influence")
    assert len(listed) == 20
    assert listed["image"].str.startswith("data:image/png;base64,").all()
    assert listed["self-influence"].is_monotonic_decreasing
    assert {"given label", "predicted", "training loss"} <= set(listed.columns)
    download = at.get("download_button")
    assert len(download) == 1 and "1000" in download[0].label
    at.number_input(key="clean_k").set_value(5).run()
    assert len(_frame(at, "self-influence")) == 5

    at.slider(key="clean_flip_percent").set_value(5)
    at.pills(key="clean_checkpoints").set_value([0.1]).run()
    with monkeypatch.context() as patch:
        patch.setattr("core.mislabel.model_mislabel_experiment", _failing)
        at.button(key="clean_run").click().run()
        assert not at.exception
        assert any("The solver gave up" in e.value for e in at.error)
        assert _charts(at) == 0

    at.button(key="clean_run").click().run()
    _no_errors(at)
    assert _charts(at) == 1
    results = _frame(at, "ranking")
    assert len(results) == 6  # 2 models x 3 rankings
    assert {"found @ 10% checked", "accuracy, fixed @ 10%", "accuracy, flipped"} <= set(
        results.columns
    )
    assert results["found @ 10% checked"].between(0, 1).all()
    assert any("training loss can beat self-influence" in i.value for i in at.info)


def test_attack_runs_two_images_and_shows_a_domain_error(
    make_app: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = make_app().run()
    at.switch_page(ATTACK).run()
    _no_errors(at)
    assert at.number_input(key="attack_budget").value == 16
    assert at.number_input(key="attack_steps").value == 10
    # Two images of test image 72, two steps of 4: on the demo this flips the logistic
    # regression's prediction (docs/beyond-single-points.md), so the flipped view is drawn.
    at.number_input(key="attack_test_index").set_value(72)
    at.number_input(key="attack_step_size").set_value(4)
    at.number_input(key="attack_steps").set_value(2)
    at.number_input(key="attack_n_perturb").set_value(2).run()

    with monkeypatch.context() as patch:
        patch.setattr("core.attack.model_attack", _not_positive_definite)
        at.button(key="attack_run").click().run()
        assert not at.exception
        # The engine's message, and which sidebar control fixes it (as on Explain and Verify).
        assert any(
            e.value.startswith("The Hessian is not positive definite.")
            and "*Damping* to 0.01 or more" in e.value
            for e in at.error
        ), [e.value for e in at.error]

    at.button(key="attack_run").click().run()
    _no_errors(at)
    (result,) = at.session_state["state_attack_results"].values()
    names = ("T-shirt/top", "Shirt")  # the default pair, in class order
    metrics = _metrics(at)
    assert metrics["Before"] == [names[result.predicted_before]]
    assert metrics["After retraining"] == [names[result.predicted_after]]
    if result.flipped:
        assert any(a.value.startswith("**Flipped.**") for a in at.success)
    else:
        assert any(a.value.startswith("**Not flipped**") for a in at.warning)
    assert {"Before", "After retraining", "Largest pixel change", "Time"} <= set(metrics)
    changed, budget = metrics["Largest pixel change"][0].split(" of ")
    assert 0 < int(changed) <= int(budget) == 16
    trained_on = [m.value for m in at.markdown if m.value.startswith("**Training image #")]
    assert len(trained_on) == 2
    assert _charts(at) == 1  # the loss history
    assert any("pixel units" in c.value for c in at.caption)
