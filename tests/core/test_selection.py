"""Choosing λ: the one-standard-error rule, per-example averaging, the held-out values against
explicit fits, and clear messages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.errors import InfluenceExplorerError
from core.models import LogisticRegression
from core.selection import (
    LambdaCurve,
    SelectionConfig,
    curve_from_values,
    held_out_values,
    one_standard_error_choice,
    select_l2,
    selection_plan,
    stratified_folds,
)


def test_one_standard_error_rule_picks_the_largest_lambda_within_one_se_of_the_best():
    mean = [0.50, 0.30, 0.29, 0.31]
    assert one_standard_error_choice(mean, [0.01, 0.01, 0.02, 0.01]) == (2, 3)
    assert one_standard_error_choice(mean, [0.01, 0.01, 0.01, 0.01]) == (2, 2)
    # For accuracy higher is better; the threshold is one s.e. below the best.
    accuracy = [0.80, 0.864, 0.864, 0.858]
    assert one_standard_error_choice(accuracy, [0.01] * 4, higher_is_better=True) == (2, 3)
    # An exact tie for the best goes to the larger λ.
    assert one_standard_error_choice([0.3, 0.3, 0.5], [0.0, 0.0, 0.0])[0] == 1
    with pytest.raises(InfluenceExplorerError, match="not finite"):
        one_standard_error_choice([0.3, math.nan], [0.1, 0.1])


def test_curve_averages_per_example_not_per_fold():
    # Two λs; 5 examples. Per example λ=1e-3 and λ=1e-2 have the same mean, but a per-fold
    # average over unequal folds ({0}, {1, 2, 3, 4}) would tell them apart.
    config = SelectionConfig(grid=(1e-3, 1e-2), folds=2, repeats=1)
    log_loss = np.array([[1.0, 0.2], [0.0, 0.2], [0.0, 0.2], [0.0, 0.2], [0.0, 0.2]])
    curve = curve_from_values({"log_loss": log_loss, "correct": np.ones((5, 2))}, config)
    assert curve.mean == pytest.approx((0.2, 0.2))
    assert curve.stderr[0] == pytest.approx(np.std(log_loss[:, 0], ddof=1) / math.sqrt(5))
    assert curve.stderr[1] == pytest.approx(0.0)
    assert curve.best == 1e-2 and curve.chosen == 1e-2
    # (repeats, n, G) values are first averaged per example over the repeats.
    stacked = {"log_loss": np.stack([log_loss, log_loss + 0.1]), "correct": np.ones((2, 5, 2))}
    assert curve_from_values(stacked, config).mean == pytest.approx((0.25, 0.25))


def test_a_best_lambda_at_either_end_of_the_grid_is_said_and_an_inner_one_is_not():
    config = SelectionConfig(grid=(1e-4, 1e-3, 1e-2, 1e-1), folds=2, repeats=1)
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 0.01, size=(40, 1))

    def curve(means: list[float]) -> LambdaCurve:
        values = np.asarray(means)[None, :] + noise
        return curve_from_values({"log_loss": values, "correct": np.ones_like(values)}, config)

    falling = curve([0.20, 0.30, 0.40, 0.50])  # still falling at the smallest λ
    assert falling.best == 1e-4
    assert "smallest λ tried (0.0001" in falling.edge_note
    assert "smaller λ might do better" in falling.edge_note
    assert falling.as_dict()["edge_note"] == falling.edge_note
    rising = curve([0.50, 0.40, 0.30, 0.20])  # still falling at the largest λ
    assert rising.best == 1e-1 and "largest λ tried (0.1" in rising.edge_note
    # A minimum inside the grid: nothing to say, even when the one-standard-error rule then
    # picks the grid's largest λ.
    inner = curve([0.50, 0.30, 0.2995, 0.2996])
    assert inner.best == 1e-2 and inner.chosen == 1e-1
    assert inner.edge_note is None and inner.as_dict()["edge_note"] is None


def test_held_out_values_are_those_of_explicit_fits(make_logreg_problem):
    problem = make_logreg_problem(40, 6, seed=3)
    config = SelectionConfig(grid=(1e-2, 1e-1), folds=2, repeats=2, seed=7)
    values = held_out_values(problem.X, problem.y, config)
    assert values["log_loss"].shape == (2, 40, 2)
    for r in range(2):
        folds = stratified_folds(problem.y, 2, np.random.default_rng([7, r]))
        assert sorted(set(folds.tolist())) == [0, 1]
        for fold in range(2):
            train, held = folds != fold, folds == fold
            for g, l2 in enumerate(config.grid):
                model = LogisticRegression(l2=l2, tol=1e-10).fit(problem.X[train], problem.y[train])
                np.testing.assert_allclose(
                    values["log_loss"][r, held, g],
                    model.loss(problem.X[held], problem.y[held]),
                    rtol=1e-6,
                )
                np.testing.assert_array_equal(
                    values["correct"][r, held, g], model.predict(problem.X[held]) == problem.y[held]
                )


def test_select_l2_on_a_clear_case(make_logreg_problem):
    # Plenty of data and little noise: a huge λ underfits, so it is not within one s.e.
    problem = make_logreg_problem(200, 5, seed=4, noise=0.3)
    config = SelectionConfig(grid=(1e-3, 1e-2, 30.0), folds=3, repeats=2)
    curve = select_l2(problem.X, problem.y, config)
    assert isinstance(curve, LambdaCurve)
    assert curve.chosen < 30.0 and curve.mean[2] > curve.mean[0] + 3 * curve.stderr[0]
    assert curve.chosen >= curve.best
    described = curve.as_dict()
    assert described["chosen"] == curve.chosen and "one standard error" in described["rule"]
    # Labels unrelated to the features: nothing beats the most regularised model.
    rng = np.random.default_rng(5)
    noise = select_l2(problem.X, rng.integers(0, 2, 200), config)
    assert noise.chosen == 30.0
    # Same seed, same curve; the criterion only reads the same values differently.
    assert select_l2(problem.X, problem.y, config) == curve
    by_accuracy = select_l2(
        problem.X, problem.y, SelectionConfig(**{**_fields(config), "criterion": "accuracy"})
    )
    assert by_accuracy.accuracy == curve.accuracy and by_accuracy.mean == curve.accuracy


def _fields(config: SelectionConfig) -> dict:
    return {k: getattr(config, k) for k in ("grid", "folds", "repeats", "criterion", "seed")}


def test_bad_settings_and_too_small_classes_get_clear_messages(make_logreg_problem):
    for kwargs, field in (
        ({"grid": (1e-3,)}, "grid"),
        ({"grid": (1e-3, -1.0)}, "grid"),
        ({"folds": 1}, "folds"),
        ({"repeats": 0}, "repeats"),
        ({"criterion": "auc"}, "criterion"),
        ({"held_out": 0}, "held_out"),
        ({"folds": 3, "held_out": 4}, "held_out"),
    ):
        with pytest.raises(InfluenceExplorerError, match=field):
            SelectionConfig(**kwargs)
    problem = make_logreg_problem(12, 3, seed=6)
    labels = np.array([0] * 9 + [1] * 3)
    with pytest.raises(InfluenceExplorerError, match="logreg_l2"):
        select_l2(problem.X, labels, SelectionConfig(folds=5))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_folds_share_one_gram_matrix_and_give_the_values_of_their_own_fits(
    make_logreg_problem, monkeypatch, n_classes
):
    # Fewer training rows than features: the fold fits take dual Newton steps, each fold's Gram
    # matrix cut from one Gram matrix of all the rows. The values must be those of fits that
    # form their own, to the fits' tolerance, with the same choice of λ.
    import core.models
    import core.selection

    problem = make_logreg_problem(45, 60, seed=8, n_classes=n_classes)
    config = SelectionConfig(grid=(1e-3, 1e-2, 1e-1), folds=3, repeats=2, seed=2)
    grams, own = [], []
    full_gram = core.selection.row_gram
    monkeypatch.setattr(core.selection, "row_gram", lambda X: grams.append(1) or full_gram(X))
    weighted = core.models.weighted_gram
    monkeypatch.setattr(core.models, "weighted_gram", lambda *a: own.append(1) or weighted(*a))
    values = held_out_values(problem.X, problem.y, config)
    assert len(grams) == 1 and not own  # one Gram matrix in all, none per fit

    monkeypatch.undo()
    for r in range(config.repeats):
        folds = stratified_folds(problem.y, 3, np.random.default_rng([2, r]))
        for fold in range(3):
            train, held = folds != fold, folds == fold
            for g, l2 in enumerate(config.grid):
                model = LogisticRegression(l2=l2, tol=1e-12).fit(problem.X[train], problem.y[train])
                np.testing.assert_allclose(
                    values["log_loss"][r, held, g],
                    model.loss(problem.X[held], problem.y[held]),
                    rtol=1e-6,
                    atol=1e-9,
                )
                np.testing.assert_array_equal(
                    values["correct"][r, held, g], model.predict(problem.X[held]) == problem.y[held]
                )


def test_a_gram_matrix_of_the_wrong_size_is_refused(make_logreg_problem):
    problem = make_logreg_problem(20, 30, seed=1)
    with pytest.raises(InfluenceExplorerError, match="row_gram"):
        LogisticRegression().fit(problem.X, problem.y, row_gram=torch.eye(19))


def test_a_hold_out_split_fits_once_per_lambda_and_averages_over_the_held_out_examples(
    make_logreg_problem,
):
    problem = make_logreg_problem(60, 5, seed=8, n_classes=3)
    config = SelectionConfig(grid=(1e-2, 1e-1), folds=4, repeats=1, held_out=1, seed=2)
    assert config.fits == 2
    values = held_out_values(problem.X, problem.y, config)
    held = stratified_folds(problem.y, 4, np.random.default_rng([2, 0])) == 0
    # Only fold 0's examples have values, and they are those of an explicit fit without them.
    assert np.isnan(values["log_loss"][0, ~held]).all()
    assert not np.isnan(values["log_loss"][0, held]).any()
    for g, l2 in enumerate(config.grid):
        model = LogisticRegression(l2=l2, tol=1e-10).fit(problem.X[~held], problem.y[~held])
        np.testing.assert_allclose(
            values["log_loss"][0, held, g], model.loss(problem.X[held], problem.y[held]), rtol=1e-6
        )
        # The fold's parameters come back as a warm start for the final fit.
        np.testing.assert_allclose(values["theta"][g], model.theta_.numpy(), atol=1e-7)
    curve = curve_from_values(values, config)
    assert curve.n == int(held.sum()) and 12 <= curve.n <= 18  # about a quarter of 60
    expected = values["log_loss"][0, held].mean(axis=0)
    np.testing.assert_allclose(curve.log_loss, expected)
    assert curve.as_dict()["held_out"] == 1 and "hold-out split of 1/4" in curve.rule


def test_the_plan_does_less_cross_validation_as_the_training_set_grows():
    small, middle, large = selection_plan(1_000), selection_plan(20_000), selection_plan(60_000)
    assert small == SelectionConfig() and small.fits == 60
    assert (middle.folds, middle.repeats, middle.fits) == (3, 1, 12)
    assert (large.folds, large.held_out_folds, large.fits) == (5, 1, 4)
    # Caches of full cross-validation keep their keys; a hold-out split has its own.
    assert "held_out" not in small.cache_fields and "held_out" not in middle.cache_fields
    assert large.cache_fields["held_out"] == 1
    assert selection_plan(60_000, seed=3).seed == 3
    # By cost: the demo's ten classes (5,000 examples, 1280-d features, 12,800 parameters) cost
    # what 50,000 binary examples would, so they get the 3 folds; its pairs keep the full plan.
    assert selection_plan(5_000, parameters=12_800) == SelectionConfig(folds=3, repeats=1)
    assert selection_plan(1_000, parameters=1_280) == SelectionConfig()
    assert selection_plan(1_500, parameters=3 * 1_280) == SelectionConfig()
    # The hold-out split still needs the examples, whatever the cost.
    assert selection_plan(20_000, parameters=10**6).held_out is None


def test_per_example_averages_skip_repeats_that_did_not_hold_an_example_out():
    from core.selection import per_example_average

    values = np.array([[[1.0], [np.nan], [np.nan]], [[3.0], [4.0], [np.nan]]])
    averaged = per_example_average(values)
    np.testing.assert_array_equal(averaged[:2, 0], [2.0, 4.0])
    assert np.isnan(averaged[2, 0])
