"""AppTest: the Trust page shows the committed fragility study (table, charts), runs one small
setting live and remembers it, and each explanation on Explain links to its reference row."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from core.errors import InfluenceExplorerError
from core.fragility import FragilityConfig, GroundTruthConfig, SolverSettings, TrainingConfig
from dashboard.services import trust

Factory = Callable[[], AppTest]

TRUST = "app_pages/trust.py"
#: A live run that takes about two seconds: 40 images, 4 epochs, 4 retrained points, short LiSSA.
TINY = FragilityConfig.quick(
    n_train=40,
    training=TrainingConfig(epochs=4, batch_size=20),
    ground_truth=GroundTruthConfig(top_k=4, retrain_fraction=0.25, seeds=1),
    influence=SolverSettings(lissa_depth=20, lissa_batch_size=20),
)


def _no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _frame(at: AppTest, column: str) -> pd.DataFrame:
    """The one table with this column (non-selectable tables carry no key in AppTest)."""
    frames = [frame.value for frame in at.dataframe if column in frame.value.columns]
    assert len(frames) == 1, f"{len(frames)} tables with a column {column!r}"
    return frames[0]


def _trust_app(make_app: Factory) -> AppTest:
    # Straight to the Trust page: it does not need the explainer, so the test does not wait for it.
    at = make_app()
    at.switch_page(TRUST)
    return at.run()


def test_the_table_has_basu_et_al_s_shape_and_the_charts_are_drawn(make_app: Factory) -> None:
    at = _trust_app(make_app)
    _no_errors(at)
    table = trust.fragility_results().table()
    frame = _frame(at, table.column_labels()[0])
    assert frame.shape == (table.shape[0], 1 + table.shape[1])
    assert list(frame.columns) == ["model", *table.column_labels()]
    # Reference rows first, then one row per CNN and solver; cells read "Pearson / Spearman".
    assert list(frame["model"][:2]) == ["Logistic regression (pixels)", "RBF SVM (pixels)"]
    assert frame["model"].str.startswith("CNN").sum() == table.shape[0] - 2
    assert frame.iloc[0, 1] == table.rows[0].cells[0].text()
    assert (frame.iloc[2:, 1:] != "—").all().all()
    # Depth/width lines and exact vs LiSSA.
    assert len(at.get("plotly_chart")) == 2
    text = "\n".join(m.value for m in at.markdown)
    assert "Not seen here" in text and "Width:" in text and "Weight decay:" in text
    assert "lower than the exact solution's in" in text
    # Another view of the chart keeps working.
    at.segmented_control(key="trust_chart_point").set_value("median_loss")
    at.segmented_control(key="trust_chart_metric").set_value("pearson").run()
    _no_errors(at)
    assert len(at.get("plotly_chart")) == 2


def test_a_live_run_shows_its_result_next_to_the_committed_row_and_is_remembered(
    make_app: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trust, "TRUST_QUICK_CONFIG", TINY)
    at = _trust_app(make_app)
    _no_errors(at)
    assert not at.button(key="trust_run").disabled
    at.segmented_control(key="trust_live_wd").set_value(0.0).run()
    at.button(key="trust_run").click().run()
    _no_errors(at)
    assert any(s.value == "CNN d1 w4, no weight decay" for s in at.subheader)
    live = _frame(at, "solver")
    assert list(live["solver"]) == ["exact", "CG", "LiSSA"]
    assert (live["high-loss: this run"] != "—").all()
    # d1 w4 is not in the committed grid: its closest network is, and the page says so.
    assert (live["high-loss: committed"] != "—").all()
    assert any("closest committed network, CNN d1 w8" in c.value for c in at.caption)
    assert {m.label for m in at.metric} >= {"Test accuracy", "λ_min", "Damping δ", "Time"}
    # Elsewhere and back: the choice and its result are still there, without running again.
    at.switch_page("app_pages/method.py").run()
    at.switch_page(TRUST).run()
    _no_errors(at)
    assert at.segmented_control(key="trust_live_wd").value == 0.0
    assert any(s.value == "CNN d1 w4, no weight decay" for s in at.subheader)
    assert at.button(key="trust_run").disabled


def test_a_failing_live_run_shows_core_s_message(
    make_app: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*args: object, **kwargs: object) -> None:
        raise InfluenceExplorerError("CG met negative curvature: raise the damping margin.")

    monkeypatch.setattr(trust, "run_setting", failing)
    at = _trust_app(make_app)
    at.button(key="trust_run").click().run()
    assert not at.exception
    assert [e.value for e in at.error] == ["CG met negative curvature: raise the damping margin."]
    assert not at.get("metric")


def test_each_explanation_links_to_its_reference_row_or_says_it_cannot(
    make_app: Factory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    at = make_app().run()
    _no_errors(at)
    rows = {s.model: s for s in trust.fragility_results().settings if s.solvers}
    lines = [c.value for c in at.caption if "How far can these scores be trusted?" in c.value]
    assert len(lines) == 2
    svm_line, logreg_line = lines
    # The default estimate is Newton-corrected, so are the numbers (recorded for convex rows).
    svm_high = rows["svm"].solvers[0].point("high_loss")
    assert f"Pearson {svm_high.corrected_pearson:.2f} / Spearman" in svm_line
    assert "RBF SVM (pixels)" in svm_line and "Newton-corrected" in svm_line
    assert "not on ImageNet features" in logreg_line
    assert all("Verify page checks this very image" in line for line in lines)
    links = [(link.proto.label, link.proto.page) for link in at.get("page_link")]
    assert links.count(("See Trust", "trust")) == 2
    # The first-order estimate shows the first-order numbers.
    at.segmented_control(key="side_estimate").set_value("first_order").run()
    _no_errors(at)
    logreg_high = rows["logistic"].solvers[0].point("high_loss")
    line = next(c.value for c in at.caption if "Logistic regression (pixels)" in c.value)
    assert f"Pearson {logreg_high.pearson:.2f} / Spearman {logreg_high.spearman:.2f}" in line
    assert "first-order estimate" in line
    # Without the results file: a plain link on Explain, core's message on Trust.
    monkeypatch.setattr(trust, "bundled_results_path", lambda: tmp_path / "missing.json")
    at.run()
    _no_errors(at)
    assert len([c for c in at.caption if "could not be read" in c.value]) == 2
    at.switch_page(TRUST).run()
    assert not at.exception
    assert len(at.error) == 1 and "influence fragility" in at.error[0].value
