"""AppTest: the Trust page shows the committed fragility study (table, charts), runs one small
setting live and remembers it, and each explanation on Explain links to its reference row."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from core.errors import InfluenceExplorerError
from core.fragility import (
    STUDY_NUMBERS,
    STUDY_SOLVER,
    Architecture,
    FragilityConfig,
    GroundTruthConfig,
    SolverSettings,
    TrainingConfig,
)
from dashboard.components.study import STUDY_COLUMNS
from dashboard.services import trust

Factory = Callable[[], AppTest]

TRUST = "app_pages/trust.py"
#: A live run that takes about two seconds: 40 images, 4 epochs, 4 retrained points, short LiSSA.
TINY = FragilityConfig.quick(
    n_train=40,
    training=TrainingConfig(epochs=4, batch_size=20),
    ground_truth=GroundTruthConfig(top_k=4, retrain_fraction=0.25, seeds=1),
    influence=SolverSettings(
        solver=dataclasses.replace(STUDY_SOLVER, lissa_depth=20, lissa_batch_size=20)
    ),
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


def test_the_study_s_numbers_the_noise_floor_and_the_table_are_shown(make_app: Factory) -> None:
    at = _trust_app(make_app)
    _no_errors(at)
    results = trust.fragility_results()
    # The study's Table 1 next to ours: one row per number the study reports, ours from core.
    study = _frame(at, "study P / S")
    comparison = trust.fragility_study_comparison(results)
    assert list(study.columns) == list(STUDY_COLUMNS)
    assert len(study) == len(STUDY_NUMBERS) == len(comparison)
    assert list(study["study's network"]) == [n.network for n in STUDY_NUMBERS]
    assert study["study P / S"].iloc[0] == "0.95 / 0.87"  # the small CNN with weight decay
    assert list(study["ours"]) == [n.counterpart.label for n in STUDY_NUMBERS]
    ran = [i for i, row in enumerate(comparison) if row.reading != "not run"]
    assert ran, "the committed results compare with none of the study's numbers"
    for i in ran:
        row = comparison[i]
        assert study["ours: CG P / S"].iloc[i] == f"{row.cg_pearson:.2f} / {row.cg_spearman:.2f}"
        assert study["reading"].iloc[i] == row.reading
    text = "\n".join(m.value for m in at.markdown)
    assert "What reproduced and what did not" in text and "Why they differ" in text
    first = comparison[ran[0]]
    assert f"here {first.cg_pearson:.2f} / {first.cg_spearman:.2f} ({first.reading})" in text
    # The noise floor: every network cell next to the best agreement noise allows.
    floor = trust.fragility_noise_floor(results)
    noise = _frame(at, "within noise from")
    assert len(noise) == len(floor) > 0
    assert list(noise["noise ceiling"]) == [f"{r.pearson_ceiling:.2f}" for r in floor]
    assert list(noise["verdict"]) == [f"{r.verdict} ({r.within_noise}/{r.repeats})" for r in floor]
    within = sum(1 for r in floor if r.verdict == "within noise")
    assert f"{within} of {len(floor)}" in text
    # Every cell of Basu et al.'s table shape, as core renders it.
    table = results.table()
    frame = _frame(at, table.column_labels()[0])
    assert frame.shape == (table.shape[0], 1 + table.shape[1])
    assert list(frame.columns) == ["model", *table.column_labels()]
    assert list(frame["model"][:2]) == ["Logistic regression (pixels)", "RBF SVM (pixels)"]
    for i, row in enumerate(table.rows):
        assert list(frame.iloc[i, 1:]) == [cell.text() for cell in row.cells]
    # A partial run says which cells it lacks.
    if results.missing:
        assert any("The committed run is partial" in w.value for w in at.warning)
    # Depth/width lines where the grid has a series, and exact vs LiSSA.
    series = [
        trust.fragility_series(results, vary, "high_loss", results.config.weight_decays[0])[1]
        for vary in ("depth", "width")
    ]
    assert len(at.get("plotly_chart")) == 1 + any(series)
    assert "lower than the exact solution's (CG's for networks too large" in text
    # Another view of the chart keeps working.
    at.segmented_control(key="trust_chart_point").set_value("median_loss")
    at.segmented_control(key="trust_chart_metric").set_value("pearson").run()
    _no_errors(at)


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
    live = _frame(at, "high-loss: this run")
    assert list(live["solver"]) == ["exact", "CG", "LiSSA"]
    assert (live["high-loss: this run"] != "—").all()
    # d1 w4 is not in the committed grid: its closest network is, and the page says so.
    assert (live["high-loss: committed"] != "—").all()
    closest, _ = trust.committed_counterpart(
        trust.fragility_results(), trust.trust_setting(Architecture(1, 4), 0.0)
    )
    assert closest.model == "cnn" and closest.label != "CNN d1 w4"
    assert any(f"closest committed network, {closest.label}" in c.value for c in at.caption)
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
    # The study has no row for a logistic regression on ImageNet features: it says so, and what
    # the nearest row (on pixels) measures, instead of citing that row as this model's.
    assert "no row for logistic regression on ImageNet features" in logreg_line
    assert "The nearest row, *Logistic regression (pixels)*" in logreg_line
    assert "Reference row *RBF SVM (pixels)*" in svm_line
    links = [(link.proto.label, link.proto.page) for link in at.get("page_link")]
    assert links.count(("See Trust", "trust")) == 2
    assert links.count(("Verify with more images", "verify")) == 2
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
