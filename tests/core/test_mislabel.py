"""Finding flipped labels: the seeded flips, the rankings, the experiment and the CSV export."""

from __future__ import annotations

import io

import numpy as np
import pytest

from core.errors import InfluenceExplorerError
from core.influence import InfluenceEngine
from core.mislabel import (
    CSV_COLUMNS,
    MislabelConfig,
    flip_labels,
    mislabel_experiment,
    rank_training_points,
    read_suspicious_csv,
    suspicious_csv,
    suspicious_points,
    write_suspicious_csv,
)
from core.models import KernelSVM, LogisticRegression


@pytest.fixture
def clean_logreg(make_logreg_problem):
    # Little label noise of its own, so the flipped labels are what stands out.
    problem = make_logreg_problem(300, 10, seed=31, noise=0.3)
    return LogisticRegression(l2=1e-3).fit(problem.X, problem.y), problem


def test_flip_labels_is_seeded_and_always_changes_the_label():
    labels = np.repeat([0, 1, 2], 50)
    flipped, chosen = flip_labels(labels, 0.1, seed=4)
    again, chosen_again = flip_labels(labels, 0.1, seed=4)
    np.testing.assert_array_equal(flipped, again)
    np.testing.assert_array_equal(chosen, chosen_again)
    assert len(chosen) == 15 and np.all(np.diff(chosen) > 0)
    assert np.all(flipped[chosen] != labels[chosen])
    assert set(np.unique(flipped[chosen])) <= {0, 1, 2}
    unchanged = np.setdiff1d(np.arange(150), chosen)
    np.testing.assert_array_equal(flipped[unchanged], labels[unchanged])
    binary, which = flip_labels(np.zeros(20, dtype=int), 0.25, n_classes=2, seed=0)
    assert binary.sum() == 5 and np.array_equal(np.flatnonzero(binary), which)
    with pytest.raises(InfluenceExplorerError, match="flip fraction"):
        flip_labels(labels, 1.0)


def test_self_influence_finds_flipped_labels_faster_than_random(clean_logreg, report):
    model, problem = clean_logreg
    config = MislabelConfig(flip_fraction=0.1, seed=2, checkpoints=(0.1, 0.2, 0.3))
    result = mislabel_experiment(model, problem.X_test, problem.y_test, config)
    assert len(result.flipped) == 30
    found = {r: result.results[r].found_after(0.2) for r in result.results}
    report(
        "mislabel (logreg n=300, 10% flipped): found after checking 20%: "
        + ", ".join(f"{r} {v:.2f}" for r, v in found.items())
        + f"; test accuracy clean {result.clean_accuracy:.3f}, noisy {result.noisy_accuracy:.3f}, "
        f"fixed (self-influence, 30%) {result.results['self_influence'].fixed_accuracy[0.3]:.3f}"
    )
    assert found["self_influence"] > found["random"] + 0.3
    areas = {r: float(np.mean(v.found)) for r, v in result.results.items()}
    assert areas["self_influence"] > areas["random"]
    for ranking in result.results.values():
        assert ranking.found[0] == 0 and ranking.found[-1] == pytest.approx(1.0)
        assert np.all(np.diff(ranking.found) >= 0)
        assert sorted(ranking.order) == list(range(300))
        assert set(ranking.fixed_accuracy) == {0.1, 0.2, 0.3}
    assert result.checked[0] == 0 and result.checked[-1] == 1
    si = result.results["self_influence"]
    assert si.found_at_checkpoints[0.2] == si.found_after(0.2)


def test_fixing_every_flip_restores_the_clean_model(clean_logreg):
    model, problem = clean_logreg
    config = MislabelConfig(flip_fraction=0.05, checkpoints=(1.0,), rankings=("random",))
    result = mislabel_experiment(model, problem.X_test, problem.y_test, config)
    assert result.results["random"].found_after(1.0) == 1.0
    assert result.results["random"].fixed_accuracy[1.0] == pytest.approx(result.clean_accuracy)


def test_experiment_runs_for_the_kernel_svm(make_svm_problem):
    problem = make_svm_problem(80, 20, seed=32)
    model = KernelSVM(gamma=0.05, l2=1e-2, temperature=0.05).fit(problem.X, problem.y)
    result = mislabel_experiment(
        model,
        problem.X_test,
        problem.y_test,
        MislabelConfig(checkpoints=(0.5,), estimate="first_order"),
    )
    assert set(result.results) == {"self_influence", "training_loss", "random"}
    assert 0 <= result.results["self_influence"].fixed_accuracy[0.5] <= 1


def test_rankings_order_by_their_values(clean_logreg):
    model, _ = clean_logreg
    engine = InfluenceEngine(model)
    by_influence = rank_training_points(engine, "self_influence")
    values = engine.self_influence("corrected")
    assert np.all(np.diff(values[by_influence]) <= 0)
    by_loss = rank_training_points(engine, "training_loss")
    losses = model.loss(model.training_inputs_, model.labels_)
    assert np.all(np.diff(losses[by_loss]) <= 0)
    np.testing.assert_array_equal(
        rank_training_points(engine, "random", seed=3),
        rank_training_points(engine, "random", seed=3),
    )
    with pytest.raises(InfluenceExplorerError, match="ranking"):
        rank_training_points(engine, "gut feeling")


def test_suspicious_list_and_its_csv_round_trip(clean_logreg, tmp_path):
    model, _ = clean_logreg
    engine = InfluenceEngine(model)
    ids = [f"img-{j:04d}" for j in range(model.n_train_)]
    rows = suspicious_points(engine, k=12, ids=ids, class_names=["cat", "dog, or wolf"])
    assert [r.rank for r in rows] == list(range(1, 13))
    assert np.all(np.diff([r.self_influence for r in rows]) <= 0)
    predicted = model.predict(model.training_inputs_)
    for row in rows:
        assert row.id == ids[row.train_index]
        assert row.predicted_label == predicted[row.train_index]
        assert row.given_label == int(model.labels_[row.train_index])
    path = tmp_path / "suspicious.csv"
    write_suspicious_csv(rows, path)
    assert read_suspicious_csv(path) == rows
    text = suspicious_csv(rows)
    assert text.splitlines()[0] == ",".join(CSV_COLUMNS)
    assert read_suspicious_csv(io.StringIO(text)) == rows
    assert len(suspicious_points(engine, k=None)) == model.n_train_
    with pytest.raises(InfluenceExplorerError, match="columns"):
        read_suspicious_csv(io.StringIO("a,b\n1,2\n"))
    with pytest.raises(InfluenceExplorerError, match="Line 2"):
        read_suspicious_csv(io.StringIO(",".join(CSV_COLUMNS) + "\nx" + ",1" * 8 + "\n"))
    with pytest.raises(InfluenceExplorerError, match="k must"):
        suspicious_points(engine, k=0)


def test_bad_mislabel_configs_are_refused():
    with pytest.raises(InfluenceExplorerError, match="flip_fraction"):
        MislabelConfig(flip_fraction=0)
    with pytest.raises(InfluenceExplorerError, match="checkpoints"):
        MislabelConfig(checkpoints=(0.1, 2.0))
    with pytest.raises(InfluenceExplorerError, match="rankings"):
        MislabelConfig(rankings=("astrology",))
    with pytest.raises(InfluenceExplorerError, match="estimate"):
        MislabelConfig(estimate="exact")
    assert hash(MislabelConfig()) == hash(MislabelConfig())


def test_cli_mislabel_returns_json_and_writes_csv(run_cli, capsys, tmp_path):
    status, payload, _ = run_cli(
        "mislabel",
        "--flip-fraction",
        "0.25",
        "--checkpoints",
        "0.25,0.5",
        "--curve-step",
        "0.25",
        "--suspicious",
        "3",
        "--csv",
        str(tmp_path / "suspicious.csv"),
        capsys=capsys,
    )
    assert status == 0
    for key in ("svm", "logreg"):
        model = payload["models"][key]
        assert model["n_flipped"] == 6
        assert set(model["rankings"]) == {"self_influence", "training_loss", "random"}
        ranking = model["rankings"]["self_influence"]
        assert set(ranking["found"]) == {"0.25", "0.5"}
        assert ranking["curve"]["checked"] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert len(model["suspicious"]) == 3
        rows = read_suspicious_csv(tmp_path / f"suspicious-{key}.csv")
        assert len(rows) == 24 and rows[0].train_index == model["suspicious"][0]["train_index"]


def test_cli_mislabel_refuses_bad_options(run_cli, capsys, tmp_path):
    for options, message in (
        (("--flip-fraction", "1.5"), "flip_fraction"),
        (("--checkpoints", "0.1,0"), "--checkpoints"),
        (("--rankings", "vibes"), "--rankings"),
        (("--curve-step", "0"), "--curve-step"),
        (("--csv", str(tmp_path / "missing" / "x.csv")), "--csv"),
    ):
        status, _, err = run_cli("mislabel", *options, capsys=capsys)
        assert status == 2, options
        assert message in err
