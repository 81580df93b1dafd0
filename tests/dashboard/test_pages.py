"""AppTest: every page runs without an exception, and the Explain controls do what they say."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from streamlit.elements.lib import policies
from streamlit.testing.v1 import AppTest

from dashboard import navigation
from tests.dashboard.conftest import wait_for_every_model

Factory = Callable[[], AppTest]


def _texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [s.value for s in at.subheader]
    parts += [c.value for c in at.caption] + [t.value for t in at.title]
    return "\n".join(parts)


def _keys(at: AppTest, prefix: str) -> list[str]:
    return [b.key for b in at.button if b.key and b.key.startswith(prefix)]


def _no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_every_registered_page_runs(make_app: Factory) -> None:
    at = make_app().run()
    _no_errors(at)
    pages = navigation.all_pages()
    assert sum(page.default for page in pages) == 1
    assert len({page.url_path for page in pages}) == len(pages)
    for page in pages:
        at.switch_page(page.script).run()
        _no_errors(at)
        assert at.title, f"{page.script} shows no title"


def test_explain_shows_both_models_lists_and_the_sign_convention(make_app: Factory) -> None:
    at = make_app().run()
    _no_errors(at)
    text = _texts(at)
    assert "Positive: it helped" in text and "negative: it hurt" in text
    assert "Exact in the margin" in text
    for model in ("svm", "logreg"):
        for kind in ("helpful", "harmful"):
            assert len(_keys(at, f"explain_inspect_{model}_{kind}_")) == 10
    assert "Test image #0" in text


def test_k_and_the_estimate_toggle(make_app: Factory) -> None:
    at = make_app().run()
    at.slider(key="side_k").set_value(3).run()
    _no_errors(at)
    assert len(_keys(at, "explain_inspect_logreg_harmful_")) == 3
    first_order_before = "Scores shown: **First order (paper)**" in _texts(at)
    assert not first_order_before
    at.segmented_control(key="side_estimate").set_value("first_order").run()
    _no_errors(at)
    assert "Scores shown: **First order (paper)**" in _texts(at)


def test_picking_a_test_image(make_app: Factory) -> None:
    at = make_app().run()
    at.button(key="explain_pick_3").click().run()
    _no_errors(at)
    assert "Test image #3" in _texts(at)
    at.number_input(key="explain_goto").set_value(150).run()
    _no_errors(at)
    assert "Test image #150" in _texts(at)
    # The selection belongs to the session and survives a visit to another page.
    at.switch_page("app_pages/compare.py").run()
    _no_errors(at)
    assert "Test image #150" in _texts(at)


@pytest.mark.parametrize("which", ["misclassified", "disagree"])
def test_gallery_filters(make_app: Factory, which: str) -> None:
    at = make_app().run()
    at.segmented_control(key="explain_gallery_filter").set_value(which).run()
    _no_errors(at)
    picks = _keys(at, "explain_pick_")
    assert 0 < len(picks) <= 16
    at.button(key=picks[0]).click().run()
    _no_errors(at)
    index = picks[0].rsplit("_", 1)[1]
    assert f"Test image #{index}" in _texts(at)


def test_gallery_settings_survive_another_page_without_a_state_warning(
    make_app: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Streamlit logs (once per process) when a widget has a default and a Session State value.
    warned: list[str] = []
    monkeypatch.setattr(policies, "_shown_default_value_warning", False)
    monkeypatch.setattr(policies._LOGGER, "warning", lambda msg, *args: warned.append(msg % args))
    at = make_app().run()
    at.segmented_control(key="explain_gallery_filter").set_value("misclassified").run()
    at.switch_page("app_pages/compare.py").run()
    at.switch_page("app_pages/explain.py").run()
    _no_errors(at)
    assert at.segmented_control(key="explain_gallery_filter").value == "misclassified"
    assert at.number_input(key="explain_gallery_page").value == 1
    assert not warned, warned


def test_class_choice(make_app: Factory) -> None:
    at = make_app().run()
    # Another pair reuses the cached features of both classes (per class), so this is quick;
    # the choice is kept sorted, whatever order it was clicked in.
    at.multiselect(key="side_classes").set_value([6, 2]).run()
    if any(b.key == "state_prepare_confirm" for b in at.button):
        at.button(key="state_prepare_confirm").click().run()
    _no_errors(at)
    # Pullover's backbone features are not cached: the SVM is shown first, then both models.
    assert len(_keys(at, "explain_inspect_svm_helpful_")) == 10
    wait_for_every_model(at)
    _no_errors(at)
    assert at.session_state["state_settings"].classes == (2, 6)
    for model in ("svm", "logreg"):
        assert len(_keys(at, f"explain_inspect_{model}_helpful_")) == 10
    at.switch_page("app_pages/method.py").run()
    _no_errors(at)
    assert any("[Pullover vs Shirt]" in s.value for s in at.subheader)


def test_fewer_than_two_classes_are_refused_with_a_message(make_app: Factory) -> None:
    at = make_app().run()
    at.multiselect(key="side_classes").set_value([0]).run()
    assert not at.exception
    assert any("at least two classes" in e.value for e in at.sidebar.error)
    assert at.session_state["state_settings"].classes == (0, 6)
    assert len(_keys(at, "explain_inspect_svm_helpful_")) == 10


def test_all_classes_and_single_classes_exclude_each_other(make_app: Factory) -> None:
    at = make_app().run()
    choice = at.multiselect(key="side_classes")
    choice.set_value([0, 6, "all"]).run()
    assert at.multiselect(key="side_classes").value == ["all"]
    assert at.session_state["state_settings"].classes == tuple(range(10))
    at.multiselect(key="side_classes").set_value(["all", 3]).run()
    assert at.multiselect(key="side_classes").value == [3]
    assert any("at least two classes" in e.value for e in at.sidebar.error)


def test_an_unavailable_backbone_is_explained_and_the_default_used(make_app: Factory) -> None:
    at = make_app().run()
    if not any("(unavailable)" in option for option in at.radio(key="side_backbone").options):
        pytest.skip("every backbone is available here (Inception v3 weights installed)")
    at.radio(key="side_backbone").set_value("inception-v3").run()
    assert not at.exception
    assert any("unavailable" in e.value for e in at.sidebar.error)
    assert at.session_state["state_settings"].backbone == "efficientnet-lite0"
    assert len(_keys(at, "explain_inspect_logreg_helpful_")) == 10


def test_inspect_opens_the_heatmap_view(make_app: Factory) -> None:
    at = make_app().run()
    at.button(key="explain_inspect_svm_helpful_0").click().run()
    _no_errors(at)
    assert at.session_state["state_inspect"][0] == "svm"
    assert "so it helped the prediction" in _texts(at)
    assert any("Red: brightening that pixel" in c.value for c in at.caption)


def test_verify_runs_and_is_remembered_for_the_session(make_app: Factory) -> None:
    at = make_app().run()
    at.switch_page("app_pages/verify.py").run()
    _no_errors(at)
    assert not at.get("plotly_chart")
    at.number_input(key="verify_k").set_value(5).run()
    at.button(key="verify_run").click().run()
    _no_errors(at)
    assert len(at.get("plotly_chart")) == 1
    table = at.table[0].value
    assert set(table["estimate"]) == {
        "Exact in the margin",
        "Newton-corrected",
        "First order (paper)",
    }
    assert (table["n"] == 5).all()
    assert table["Spearman"].notna().all()
    # Back on Explain and again on Verify: the result is still there, without retraining.
    at.switch_page("app_pages/explain.py").run()
    at.switch_page("app_pages/verify.py").run()
    _no_errors(at)
    assert len(at.get("plotly_chart")) == 1
    assert at.button(key="verify_run").label == "Retrain again"
