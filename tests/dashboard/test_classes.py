"""Any number of classes in the dashboard: the class choice and its links, what a large choice
costs before it starts, Cancel, every page with three classes explaining an upload, and the
Method page's λ curve."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from core.data import DEBIAN_FASHION_MNIST_DIR
from core.errors import InfluenceExplorerError, PreparationCancelled
from core.explainer import PreparationCost, StageCost
from core.store import ENV_CACHE_DIR
from dashboard import navigation
from dashboard.components.classes import class_colours, label_makeup, lambda_curve
from dashboard.services import engines, facts, links, preparing, uploads
from dashboard.services.background import Preparation
from dashboard.services.link_params import LinkValueError
from dashboard.services.settings import Settings
from tests.dashboard.conftest import wait_for_every_model
from tests.upload_corpus import build_upload_corpus

Factory = Callable[[], AppTest]
THREE = (0, 2, 6)  # T-shirt/top, Pullover, Shirt: the demo's most confused classes
CAP = 100


def _no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [s.value for s in at.subheader]
    return "\n".join(parts + [c.value for c in at.caption] + [i.value for i in at.info])


def _inspect_buttons(at: AppTest) -> list[str]:
    return [b.key for b in at.button if b.key and b.key.startswith("explain_inspect_")]


# ---------------------------------------------------------------- settings, links, figures


def test_settings_take_any_number_of_classes_but_at_least_two_different() -> None:
    assert Settings(classes=[0, 2, 6]).classes == THREE
    assert Settings(classes=range(10)).config().classes == tuple(range(10))
    assert Settings(max_train_per_class=None).config().max_train_per_class is None
    for bad in ((3,), (3, 3), (0, 2, 0)):
        with pytest.raises(InfluenceExplorerError, match="at least two different"):
            Settings(classes=bad)


def test_a_link_s_classes_are_all_or_two_or_more_indices() -> None:
    assert links._parse_classes("all", 10) == ["all"]
    assert links._parse_classes("6,0,2", 10) == [0, 2, 6]
    for text, message in (
        ("5", "two or more"),
        ("3,3", "listed twice"),
        ("0,10", "from 0 to 9"),
        ("0,x", "whole number"),
    ):
        with pytest.raises(LinkValueError, match=message):
            links._parse_classes(text, 10)


def test_ten_classes_get_ten_colours_in_the_label_makeup() -> None:
    names = [f"class {i}" for i in range(10)]
    for n in (2, 8, 10, 24, 30):
        colours = class_colours(n)
        assert len(colours) == n and len(set(colours)) == min(n, 26)
    figure = label_makeup(
        [("SVM · most helpful", {"class 0": 3, "class 9": 7}), ("LR · most harmful", {})], names
    )
    assert [trace.name for trace in figure.data] == names
    assert len({trace.marker.color for trace in figure.data}) == 10
    assert list(figure.data[9].x) == [7, 0] and list(figure.data[0].x) == [3, 0]


def test_the_lambda_curve_marks_the_best_and_the_chosen_lambda() -> None:
    figure = lambda_curve(
        (1e-4, 1e-3, 1e-2, 1e-1),
        (0.40, 0.35, 0.36, 0.45),
        (0.01, 0.01, 0.01, 0.01),
        best=1e-3,
        chosen=1e-2,
        criterion="held-out log-loss",
    )
    marked = {trace.name: (trace.x[0], trace.y[0]) for trace in figure.data if len(trace.x) == 1}
    assert marked == {"best λ = 0.001": (1e-3, 0.35), "chosen λ = 0.01": (1e-2, 0.36)}
    band = figure.layout.shapes[0]
    assert (band.y0, band.y1) == pytest.approx((0.34, 0.36))


def test_runners_up_only_with_three_or_more_classes() -> None:
    names = ("a", "b", "c", "d", "e")
    assert facts.runners_up(np.array([0.3, 0.7]), names[:2]) == ""
    text = facts.runners_up(np.array([0.05, 0.6, 0.2, 0.1, 0.05]), names)
    assert text == " Next: c 0.20, d 0.10, a 0.05."


# ---------------------------------------------------------------- cost first, then Cancel


def _cost(flops: float, images: int = 0) -> PreparationCost:
    return PreparationCost(
        5000, 10, "Nyström, 1000 landmarks", (StageCost("Fitting", flops, 2**30, images),)
    )


def test_which_choices_ask_first_and_how_progress_reads() -> None:
    assert not preparing.is_large(_cost(1e11))
    assert preparing.is_large(_cost(preparing.CONFIRM_FROM_FLOPS))
    assert preparing.is_large(_cost(1e9, images=preparing.CONFIRM_FROM_IMAGES))
    text = preparing.stage_text("Choosing the logistic regression's λ", 12, 60, 60_000)
    assert text == "Choosing the logistic regression's λ on 60,000 images: 12 of 60"
    assert preparing.stage_text("RBF SVM: Hessian", 0, 0, 60_000) == "RBF SVM: Hessian"


def test_cancel_stops_a_preparation_at_its_next_report() -> None:
    reports: list[int] = []
    pause = threading.Event()

    def build(job: Preparation) -> None:
        for step in range(10_000):
            job.report("counting", step, 10_000)  # raises once cancelled
            reports.append(step)
            pause.wait(0.01)
        raise AssertionError("never cancelled")

    job = Preparation(build)  # type: ignore[arg-type]
    while not reports:
        pause.wait(0.01)
    job.cancel()
    assert job.wait(30)
    assert job.cancelled and isinstance(job.error, PreparationCancelled)
    assert "cancelled during 'counting'" in str(job.error)
    assert job.result is None and len(reports) < 10_000


def test_a_large_choice_shows_its_cost_and_starts_only_on_prepare(
    make_app: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = _cost(5e13, images=48_000)
    monkeypatch.setattr(preparing, "estimate", lambda engine: big)
    started: list[object] = []
    monkeypatch.setattr(engines, "Explainer", lambda *args, **kwargs: started.append(args))
    at = make_app()
    at.query_params.update({"classes": "all"})
    at.run()
    _no_errors(at)
    assert at.multiselect(key="side_classes").value == ["all"]
    assert at.session_state["state_settings"].classes == tuple(range(10))
    assert at.query_params["classes"] in ("all", ["all"])
    text = _texts(at)
    assert "Prepare 10 classes, 5,000 training images?" in text
    assert "50.0 TFLOP" in text and "48,000 images" in text
    assert not _inspect_buttons(at)
    # The Method page does not start it either; the default choice never asks.
    at.switch_page("app_pages/method.py").run()
    _no_errors(at)
    assert not started
    at.switch_page("app_pages/explain.py").run()
    at.button(key="state_prepare_confirm").click().run()
    assert started, "Prepare starts the preparation"


def test_a_cancelled_preparation_says_so_and_offers_to_start_again(
    make_app: Factory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An empty cache: this choice would take minutes, and is cancelled at its first report.
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path))
    settings = Settings(classes=(1, 7))
    preparing.confirm(settings.engine)
    job = engines.preparation(settings)
    job.cancel()
    assert job.wait(300)
    assert job.cancelled
    at = make_app()
    at.query_params.update({"classes": "1,7"})
    at.run()
    _no_errors(at)
    assert any("cancelled" in i.value for i in at.info)
    assert "Prepare 2 classes, 1,000 training images?" in _texts(at)
    assert engines.preparations().peek(settings.engine) is None


# ---------------------------------------------------------------- three classes, every page


@pytest.mark.slow
def test_three_classes_explain_an_upload_on_every_page(make_app: Factory) -> None:
    at = make_app().run()
    # 100 training images per class keep the three-class fits quick (the test split is whole).
    at.number_input(key="side_max_train").set_value(CAP)
    at.multiselect(key="side_classes").set_value([6, 0, 2]).run()
    if any(b.key == "state_prepare_confirm" for b in at.button):
        at.button(key="state_prepare_confirm").click().run()
    wait_for_every_model(at)  # the capped classes' features are new: the SVM comes first
    _no_errors(at)
    assert at.session_state["state_settings"].classes == THREE
    assert at.query_params["classes"] in ("0,2,6", ["0,2,6"])

    case = next(c for c in build_upload_corpus() if c.name == "grayscale_png")
    outcome = uploads.decode_uploaded_file(
        case.filename, case.data, image_shape=(28, 28, 1), light_on_dark=True
    )
    at.session_state["state_upload"] = outcome.upload
    at.session_state["state_source"] = "upload"
    at.run()
    _no_errors(at)
    text = _texts(at)
    assert f"Uploaded `{case.filename}`" in text
    # Each model: its prediction, the two runners-up of three classes, and its own prediction as
    # the explained label (an upload has no true label).
    assert text.count("Next: ") == 2
    names = ("T-shirt/top", "Pullover", "Shirt")
    for line in (m.value for m in at.markdown if m.value.startswith("Predicts **")):
        predicted = line.split("**")[1]
        assert predicted in names
        assert f"Explaining the loss of **{predicted}**" in line
    buttons = _inspect_buttons(at)
    assert len(buttons) == 40  # helpful and harmful, k = 10, for both models
    helpful = {b.key for b in at.button if b.key and "_helpful_" in b.key}
    assert len(helpful) == 20

    at.switch_page("app_pages/compare.py").run()
    _no_errors(at)
    makeup = next(d.value for d in at.dataframe if "list" in d.value.columns)
    assert [c for c in makeup.columns if c in names] == list(names)
    assert (makeup[list(names)].sum(axis=1) == 10).all()

    for page in navigation.all_pages():
        if page.script in ("app_pages/explain.py", "app_pages/compare.py"):
            continue
        at.switch_page(page.script).run()
        _no_errors(at)
        assert at.title, page.script

    at.switch_page("app_pages/method.py").run()
    text = _texts(at)
    assert f"3 classes; n = {3 * CAP} training" in text
    assert "one standard error" in text and "Its limit." in text
    curve = [c for c in at.get("plotly_chart")]
    assert curve, "the λ curve is drawn"


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist is not installed"
)
def test_the_full_fashion_mnist_is_offered_with_what_it_costs(make_app: Factory) -> None:
    at = make_app().run()
    dataset = at.selectbox(key="side_dataset")
    assert "Fashion-MNIST (full, 60k; Debian package)" in dataset.options
    dataset.set_value("fashion-mnist").run()
    at.multiselect(key="side_classes").set_value(["all"]).run()
    at.checkbox(key="side_max_train_all").check().run()
    _no_errors(at)
    settings = at.session_state["state_settings"]
    assert settings.max_train_per_class is None and settings.classes == tuple(range(10))
    assert at.query_params["max_train"] in ("all", ["all"])
    # Nothing is prepared until asked: the cost of 60,000 images and 70,000 to featurise.
    text = _texts(at)
    assert "Prepare 10 classes, 60,000 training images?" in text
    assert "Nyström, 1000 landmarks" in text
    assert not _inspect_buttons(at)
