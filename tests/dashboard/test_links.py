"""AppTest: every view is a link (parameters in, address out, bad links explained), Explain's
exports, and the warnings beside the lists (negligible scores, the trust row, Platt scaling)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable

import numpy as np
from streamlit.testing.v1 import AppTest

Factory = Callable[[], AppTest]


def _texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [s.value for s in at.subheader]
    parts += [c.value for c in at.caption] + [t.value for t in at.title]
    parts += [i.value for i in at.info] + [w.value for w in at.warning]
    return "\n".join(parts)


def _no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _inspect_buttons(at: AppTest, model: str, kind: str) -> list[str]:
    prefix = f"explain_inspect_{model}_{kind}_"
    return [b.key for b in at.button if b.key and b.key.startswith(prefix)]


def test_a_link_opens_its_image_and_settings_and_the_address_follows_the_view(
    make_app: Factory,
) -> None:
    at = make_app()
    at.query_params.update(
        {"dataset": "demo", "classes": "0,6", "estimate": "first_order", "k": "4", "test": "49"}
    )
    at.run()
    _no_errors(at)
    text = _texts(at)
    assert "Test image #49" in text
    assert "Scores shown: **First order (paper)**" in text
    assert len(_inspect_buttons(at, "logreg", "helpful")) == 4
    assert at.session_state["state_settings"].estimate == "first_order"
    # The address describes the view: picking another image rewrites it.
    assert at.query_params["test"] in ("49", ["49"])
    at.button(key="explain_pick_3").click().run()
    _no_errors(at)
    assert at.query_params["test"] in ("3", ["3"])
    assert at.query_params["k"] in ("4", ["4"])


def test_bad_and_stale_parameters_get_a_notice_and_a_fallback(make_app: Factory) -> None:
    at = make_app()
    at.query_params.update(
        {"test": "5000", "k": "abc", "classes": "3,3", "upload": "f" * 64, "colour": "red"}
    )
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    notices = "\n".join(w.value for w in at.warning)
    assert "test image #5000" in notices and "showing test image #0" in notices
    assert "k=`abc` was ignored" in notices
    assert "classes=`3,3` were ignored" in notices and "T-shirt/top vs Shirt" in notices
    assert "is not kept on this server" in notices
    assert "`colour`=`red` is not a setting of this page" in notices
    assert "Test image #0" in _texts(at)
    assert at.session_state["state_settings"].k == 10
    # Dismissed, they go; the view stays.
    at.button(key="link_notices_dismiss").click().run()
    assert not [w for w in at.warning if "link" in w.value]
    assert "Test image #0" in _texts(at)


def test_a_page_link_sets_its_own_controls(make_app: Factory) -> None:
    at = make_app()
    at.switch_page("app_pages/attack.py")
    at.query_params.update({"model": "svm", "test": "7", "budget": "24", "model_x": "1"})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.radio(key="attack_model").value == "svm"
    assert at.number_input(key="attack_test_index").value == 7
    assert at.number_input(key="attack_budget").value == 24
    assert at.query_params["budget"] in ("24", ["24"])
    assert any("`model_x`" in w.value for w in at.warning)


def test_an_upload_is_kept_by_content_and_a_link_to_it_opens_it(make_app: Factory) -> None:
    from dashboard.services.uploads import decode_uploaded_file, keep_upload, kept_upload
    from tests.upload_corpus import build_upload_corpus

    case = next(c for c in build_upload_corpus() if c.name == "grayscale_png")
    outcome = decode_uploaded_file(
        case.filename, case.data, image_shape=(28, 28, 1), light_on_dark=True
    )
    upload = outcome.upload
    assert upload is not None and keep_upload(upload)
    again = kept_upload(upload.digest)
    assert again is not None and np.array_equal(again.image, upload.image)
    assert kept_upload("0" * 64) is None and kept_upload("../etc/passwd") is None

    at = make_app()
    at.query_params.update({"upload": upload.digest})
    at.run()
    _no_errors(at)
    assert "Uploaded `gray.png`" in _texts(at)
    assert at.query_params["upload"] in (upload.digest, [upload.digest])


def test_explain_exports_agree_with_each_other(make_app: Factory) -> None:
    at = make_app()
    at.query_params.update({"test": "12", "k": "3"})
    at.run()
    _no_errors(at)
    from dashboard.services import explanations  # noqa: F401 (the cache lives in this process)

    buttons = {b.key: b for b in at.get("download_button")}
    assert {"explain_download_json", "explain_download_csv", "explain_download_html"} <= set(
        buttons
    )
    # AppTest does not fetch the files; build the same documents the page offers.
    from core import report
    from dashboard.services.engines import preparation
    from dashboard.services.settings import Settings

    explainer = preparation(Settings(k=3)).result
    built = report.build_report(explainer, test_index=12, k=3, link="?test=12")
    document = json.loads(report.report_json(built))
    rows = list(csv.DictReader(io.StringIO(report.report_csv(built))))
    assert len(rows) == len(document["models"]) * explainer.n_train
    for row in rows[:: len(rows) // 50]:
        model = document["models"][row["model"]]
        j = int(row["train_index"])
        for estimate in document["estimates"]:
            assert float(row[f"score_{estimate}"]) == model["scores"][estimate][j]
    page = report.report_html(built)
    for model in document["models"].values():
        for item in model["helpful"] + model["harmful"]:
            assert f'data-train-index="{item["train_index"]}"' in page
            assert f"{item['score']:+.3g}" in page
    assert "?test=12" in page and "http" not in page.split("<body>")[1].replace(
        'href="?test=12"', ""
    ), "the report must not load anything from the network"


def test_negligible_scores_are_said_and_the_svm_probability_is_labelled(
    make_app: Factory,
) -> None:
    # Test image #5: the default SVM (median γ, t = 0.1) classifies it so confidently that every
    # score is below 1e-8.
    at = make_app()
    at.query_params.update({"test": "5"})
    at.run()
    _no_errors(at)
    text = _texts(at)
    assert "is all but certain here" in text and "less than 1e-06" in text
    assert "(Platt-scaled p = " in text
    assert "no row for logistic regression on ImageNet features" in text
    assert "Reference row *RBF SVM (pixels)*" in text


def test_a_verification_is_kept_on_the_server_for_whoever_opens_the_view_next(
    make_app: Factory,
) -> None:
    at = make_app().run()
    at.switch_page("app_pages/verify.py").run()
    at.number_input(key="verify_k").set_value(4).run()
    at.button(key="verify_run").click().run()
    _no_errors(at)
    assert len(at.get("plotly_chart")) == 1
    assert "Verified in this session: test image #0 (k = 4)." in _texts(at)
    # Another session (a colleague following the link) is shown it without retraining, and told
    # it was not run there.
    other = make_app().run()
    other.switch_page("app_pages/verify.py").run()
    other.number_input(key="verify_k").set_value(4).run()
    _no_errors(other)
    assert len(other.get("plotly_chart")) == 1
    assert "test image #0 (k = 4, read back from an earlier run)" in _texts(other)
