"""Reports and exports (core.report), the score-size rule, and the applications' new defaults
(the attack's least-confident correct images, refitting without marked images)."""

from __future__ import annotations

import csv
import io
import json
import math
import re

import numpy as np
import pytest

from core import report
from core.attack import lowest_margin_correct
from core.data import open_dataset
from core.errors import InfluenceExplorerError
from core.explainer import Explainer
from core.influence import ESTIMATES
from core.mislabel import MislabelConfig, best_ranking, model_mislabel_experiment, refit_without
from core.models import KernelSVM, LogisticRegression
from core.store import ArtifactStore


@pytest.fixture(scope="module")
def explainer(tiny_idx_dataset, tmp_path_factory) -> Explainer:
    store = ArtifactStore(tmp_path_factory.mktemp("report-cache"))
    return Explainer(open_dataset(tiny_idx_dataset), store=store).prepare()


def test_the_negligible_rule_is_in_loss_units_and_says_why() -> None:
    certain = report.score_scale(np.array([1.9e-7, -2e-7, 0.0]), loss=2.1e-7)
    assert certain.negligible and certain.certain and certain.largest == 2e-7
    message = certain.message("RBF SVM on pixels")
    assert "all but certain" in message and "less than 1e-06" in message
    assert math.isclose(certain.relative(1.9e-7), 1.9e-7 / 2.1e-7)
    # One score at the threshold is not negligible; nor is a large-loss, small-score case said
    # to be certain.
    assert not report.score_scale(np.array([1e-6, 0.0]), loss=0.5).negligible
    small = report.score_scale(np.array([1e-8]), loss=0.4)
    assert small.negligible and not small.certain and "loss 0.4" in small.message("m")
    assert report.score_scale(np.array([0.1]), loss=0.5).message("m") is None
    assert math.isnan(report.score_scale(np.array([0.0]), loss=0.0).relative(1.0))


def test_the_heatmap_scale_starts_at_a_floor_in_loss_units() -> None:
    tiny = np.full((4, 4, 1), 3e-10)
    assert report.heatmap_scale(tiny) == report.HEATMAP_FLOOR
    assert math.isclose(report.HEATMAP_FLOOR * 255, report.NEGLIGIBLE_LOSS_CHANGE)
    large = np.linspace(0, 1, 1000)
    assert math.isclose(report.heatmap_scale(large), np.percentile(large, 99))


def test_only_a_platt_scaled_model_is_labelled_so() -> None:
    svm = KernelSVM()
    svm.platt_ = 3.0  # what a fitted kernel SVM has
    assert report.probability_kind(svm) == "Platt-scaled"
    assert report.probability_kind(LogisticRegression()) is None
    assert report.probability_text(0.84, "Platt-scaled") == "Platt-scaled p = 0.84"


def test_the_three_documents_of_one_explanation_agree(explainer: Explainer) -> None:
    built = report.build_report(explainer, test_index=1, k=3, link="http://host/?test=1")
    document = json.loads(report.report_json(built))
    assert document["format"] == report.REPORT_FORMAT and document["test_index"] == 1
    assert document["estimates"] == list(ESTIMATES)
    n = explainer.n_train
    rows = list(csv.DictReader(io.StringIO(report.report_csv(built))))
    assert len(rows) == n * len(explainer.models)
    for row in rows:
        model = document["models"][row["model"]]
        j = int(row["train_index"])
        assert row["id"] == document["training_images"]["id"][j]
        for estimate in document["estimates"]:
            assert float(row[f"score_{estimate}"]) == model["scores"][estimate][j]
    # The corrected and first-order scores differ (by 1 / (1 - leverage)) but rank alike.
    for model in document["models"].values():
        assert model["scores"]["corrected"] != model["scores"]["first_order"]
        assert model["probability_kind"] in (None, "Platt-scaled")
    html = report.report_html(built)
    for key, model in document["models"].items():
        assert f'data-model="{key}"' in html
        for item in model["helpful"] + model["harmful"]:
            assert f'data-train-index="{item["train_index"]}"' in html
            assert f"{item['score']:+.3g}" in html
    assert 'href="http://host/?test=1"' in html
    # Self-contained: images are inline, nothing is fetched.
    assert not re.search(r'(src|href)="(?!data:|http://host/)', html)
    assert html.count("data:image/png;base64,") >= 1 + sum(
        len(m["helpful"]) + len(m["harmful"]) for m in document["models"].values()
    )


def test_a_report_reuses_a_given_explanation_and_escapes_what_it_shows(explainer) -> None:
    shown = explainer.explain(test_index=0, k=2, estimate="first_order")
    built = report.build_report(
        explainer,
        test_index=0,
        k=2,
        estimate="first_order",
        explanations={"first_order": shown},
        title="Uploaded <script>x</script>.png",
    )
    assert built.explanation is shown
    assert "<script>x" not in report.report_html(built)
    with pytest.raises(InfluenceExplorerError, match="estimate"):
        report.build_report(explainer, test_index=0, estimate="second")


def test_a_verification_survives_the_store_and_its_documents_agree(explainer, tmp_path) -> None:
    checks = explainer.verify(test_index=2, k=4)
    arrays, meta = report.verification_arrays(checks["svm"])
    store = ArtifactStore(tmp_path)
    from core.store import CacheKey

    key = CacheKey.of("verification", {"q": "test:2"})
    store.save(key, arrays, meta)
    loaded = store.load_artifact(key)
    again = report.verification_from_arrays(loaded.arrays, loaded.meta)
    assert np.array_equal(again.train_indices, checks["svm"].train_indices)
    assert again.agreement == checks["svm"].agreement
    with pytest.raises(InfluenceExplorerError):
        report.verification_from_arrays({}, {})

    names = list(explainer.class_names)
    ids = [str(i) for i in explainer.dataset.train_ids]
    labels = [names[int(c)] for c in explainer.train_labels]
    queries = [report.VerifiedQuery("Test image #2", 2, checks)]
    document = json.loads(
        report.verification_json(
            queries, model_labels={"svm": "SVM"}, train_ids=ids, train_labels=labels
        )
    )
    rows = list(
        csv.DictReader(
            io.StringIO(report.verification_csv(queries, train_ids=ids, train_labels=labels))
        )
    )
    points = [p for m in document["results"][0]["models"].values() for p in m["points"]]
    assert len(rows) == len(points) == 4 * len(checks)
    for row, point in zip(rows, points, strict=True):
        assert float(row["actual"]) == point["actual"]
        assert float(row["predicted_corrected"]) == point["predicted_corrected"]
    stats = list(csv.DictReader(io.StringIO(report.verification_statistics_csv(queries))))
    assert {(r["model"], r["estimate"]) for r in stats} == {
        (k, e) for k in checks for e in ESTIMATES
    }


def test_cli_writes_the_same_documents(run_cli, capsys, tmp_path) -> None:
    paths = [tmp_path / f"r.{suffix}" for suffix in ("html", "json", "csv")]
    options = [o for path in paths for o in ("--output", str(path))]
    status, payload, _ = run_cli(
        "explain", "--test-index", "1", "--k", "2", *options, capsys=capsys
    )
    assert status == 0 and payload["outputs"] == [str(p) for p in paths]
    document = json.loads(paths[1].read_text())
    for key, model in payload["models"].items():
        assert [i["train_index"] for i in model["helpful"]] == [
            i["train_index"] for i in document["models"][key]["helpful"]
        ]
    assert "<!DOCTYPE html>" in paths[0].read_text()
    header = "model,train_index,id,label," + ",".join(f"score_{e}" for e in ESTIMATES)
    assert paths[2].read_text().startswith(header)
    status, _, err = run_cli("explain", "--test-index", "1", "--output", "r.pdf", capsys=capsys)
    assert status == 2 and ".pdf" in err

    out = tmp_path / "v.csv"
    status, payload, _ = run_cli(
        "verify", "--test-index", "1", "--k", "3", "--output", str(out), capsys=capsys
    )
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 3 * len(payload["results"][0]["models"])


def test_the_attack_starts_from_the_least_confident_correct_images(explainer) -> None:
    for fitted in explainer.models.values():
        chosen = lowest_margin_correct(fitted, explainer.test_labels, count=3)
        probabilities = fitted.model.predict_proba(fitted.test_inputs)
        truth = np.asarray(explainer.test_labels)
        correct = np.flatnonzero(fitted.model.predict(fitted.test_inputs) == truth)
        assert set(chosen) <= set(correct.tolist())
        own = probabilities[np.arange(len(truth)), truth]
        margins = 2 * own - 1  # binary: p_true - p_other
        assert list(margins[chosen]) == sorted(margins[chosen])
        assert margins[chosen[0]] == min(margins[correct])


def test_refitting_without_marked_images(explainer) -> None:
    fitted = explainer.models["logreg"]
    result = refit_without(fitted, explainer.dataset, [0, 3, 3])
    assert list(result.removed) == [0, 3] and result.converged
    before = fitted.model.accuracy(fitted.test_inputs, explainer.test_labels)
    assert result.accuracy_before == before
    delta = (len(result.fixed) - len(result.broken)) / explainer.n_test
    assert math.isclose(result.accuracy_after - result.accuracy_before, delta)
    for bad, message in (([], "at least one"), ([10_000], "out of range")):
        with pytest.raises(InfluenceExplorerError, match=message):
            refit_without(fitted, explainer.dataset, bad)


def test_the_best_ranking_is_read_off_the_experiment(explainer) -> None:
    experiment = model_mislabel_experiment(
        explainer.models["svm"],
        explainer.dataset,
        MislabelConfig(flip_fraction=0.25, checkpoints=(0.5,)),
    )
    name, found = best_ranking(experiment, 0.5)
    assert found == max(r.found_after(0.5) for r in experiment.results.values())
    assert experiment.results[name].found_after(0.5) == found
