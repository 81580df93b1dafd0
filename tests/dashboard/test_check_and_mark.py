"""AppTest: the checks and actions issue 16 put where results are read: the out-of-distribution
warning, the quick check on Explain, Verify's exports, the Attack's first image, and marking
images on Data cleaning and refitting without them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from streamlit.testing.v1 import AppTest

from core.attack import lowest_margin_correct
from dashboard.services import engines, uploads
from tests.prepared_cache import REPO

Factory = Callable[[], AppTest]
CAT = REPO / "tests" / "assets" / "photos" / "cat.jpg"


def _no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _explainer(at: AppTest):
    explainer = engines.explainer_if_ready(at.session_state["state_settings"])
    assert explainer is not None
    return explainer


def test_an_animal_photo_is_flagged_per_model_and_a_test_image_is_not(make_app: Factory) -> None:
    at = make_app().run()
    _no_errors(at)
    assert not [w for w in at.warning if "unlike the training data" in w.value]
    outcome = uploads.decode_uploaded_file(
        "cat.jpg", CAT.read_bytes(), image_shape=(28, 28, 1), light_on_dark=True
    )
    at.session_state["state_upload"] = outcome.upload
    at.session_state["state_source"] = "upload"
    at.run()
    _no_errors(at)
    flagged = [w.value for w in at.warning if "unlike the training data" in w.value]
    explanation = _explainer(at).explain(image=outcome.upload.image, k=1)
    expected = [m.familiarity.message(m.label) for m in explanation.models.values()]
    assert flagged == [
        text
        for text, m in zip(expected, explanation.models.values(), strict=True)
        if m.familiarity.unusual
    ]
    assert flagged, "the cat photo should be unlike the clothes for at least one model"


def test_the_quick_check_runs_in_place_and_verify_offers_its_exports(make_app: Factory) -> None:
    at = make_app()
    at.query_params.update({"test": "17"})
    at.run()
    _no_errors(at)
    buttons = [b for b in at.button if b.key and b.key.startswith("explain_run_check_")]
    if buttons:  # not checked on this server before
        buttons[0].click().run()
        _no_errors(at)
    labels = [m.label for m in at.metric]
    count = len(_explainer(at).models)
    assert labels.count("Pearson") == labels.count("Spearman") == labels.count("Slope") == count
    # The same check is Verify's at k = 10, with its downloads.
    at.switch_page("app_pages/verify.py").run()
    at.number_input(key="verify_k").set_value(10).run()
    _no_errors(at)
    assert len(at.get("plotly_chart")) == 1
    downloads = {b.proto.label for b in at.get("download_button")}
    assert {"Scatter data (CSV)", "Statistics (CSV)", "Everything (JSON)"} <= downloads


def test_the_attack_starts_from_the_model_s_least_confident_correct_image(
    make_app: Factory,
) -> None:
    at = make_app().run()
    at.switch_page("app_pages/attack.py").run()
    _no_errors(at)
    explainer = _explainer(at)
    for key in explainer.models:
        at.radio(key="attack_model").set_value(key).run()
        _no_errors(at)
        first = lowest_margin_correct(explainer.models[key], explainer.test_labels, count=1)[0]
        # Follows the model while the user has not chosen an image.
        assert at.number_input(key="attack_test_index").value == first
    at.number_input(key="attack_test_index").set_value(5).run()
    other = next(k for k in explainer.models if k != at.radio(key="attack_model").value)
    at.radio(key="attack_model").set_value(other).run()
    assert at.number_input(key="attack_test_index").value == 5


def test_marked_images_are_exported_and_left_out_of_a_refit(make_app: Factory) -> None:
    at = make_app().run()
    at.switch_page("app_pages/cleaning.py").run()
    # As if the page's link were opened in a new session (AppTest opens its first run on the
    # home page when the page's path is not its file name).
    at.session_state["state_link_applied"] = False
    at.query_params.update({"marked": "3,17,9999"})
    at.run()
    assert not at.exception
    assert any("outside 0 to 999" in w.value for w in at.warning)
    assert at.session_state["state_clean_marked"] == [3, 17]
    downloads = {b.proto.label for b in at.get("download_button")}
    assert "Marked list (CSV)" in downloads
    at.button(key="clean_refit").click().run()
    assert not at.exception
    metrics = {m.label: m for m in at.metric}
    before = float(metrics["Test accuracy before"].value)
    after = float(metrics["Without the marked images"].value)
    model = at.radio(key="clean_model").value
    from core.mislabel import refit_without

    explainer = _explainer(at)
    expected = refit_without(explainer.models[model], explainer.dataset, [3, 17])
    assert (before, after) == (
        round(expected.accuracy_before, 3),
        round(expected.accuracy_after, 3),
    )
    assert np.array_equal(expected.removed, [3, 17])
    at.button(key="clean_clear").click().run()
    assert at.session_state["state_clean_marked"] == []
    assert at.query_params.get("marked") in (None, "", [""], [])
