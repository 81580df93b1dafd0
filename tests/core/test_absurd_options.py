"""Absurd options and degenerate data get a message or a visible warning saying what range makes
sense, within seconds: damping so large that every score shrinks with it, k beyond the training
set, a class with one training image."""

from __future__ import annotations

import time

import numpy as np
import pytest

from core.data import Dataset
from core.errors import InfluenceExplorerError
from core.explainer import MIN_TRAIN_PER_CLASS, Explainer, ExplainerConfig
from core.influence import DampingWarning, SolverConfig
from core.store import ArtifactStore
from tests.core.test_explainer import _tiny_demo


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    return ArtifactStore(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tiny() -> Dataset:
    return _tiny_demo()


@pytest.fixture(scope="module")
def explainer(tiny: Dataset, store: ArtifactStore) -> Explainer:
    return Explainer(tiny, store=store).prepare()


def test_damping_larger_than_the_curvature_is_reported_with_the_range_that_makes_sense(
    tiny: Dataset, store: ArtifactStore, explainer: Explainer
) -> None:
    config = ExplainerConfig(solver=SolverConfig(damping=1e300))
    with pytest.warns(DampingWarning):
        damped = Explainer(tiny, config, store=store).prepare()
    assert len(damped.warnings) == len(damped.models)  # one per model, each naming it
    for message, fitted in zip(damped.warnings, damped.models.values(), strict=True):
        assert message.startswith(f"{fitted.label}: damping 1e+300 is more than 1e+06 times")
        assert "Damping that makes sense is 0 to about the trace" in message
    # What the warning is about: the scores are shrunk by about the damping.
    plain = explainer.explain(test_index=0).models["svm"].helpful[0].score
    shrunk = damped.explain(test_index=0).models["svm"].helpful[0].score
    assert abs(shrunk) < 1e-250 < abs(plain)


def test_damping_below_the_curvature_is_not_reported(tiny: Dataset, store: ArtifactStore) -> None:
    config = ExplainerConfig(solver=SolverConfig(damping=1e-3))
    assert Explainer(tiny, config, store=store).prepare().warnings == ()


@pytest.mark.parametrize("k", [10**9, 33, 2, 0])
def test_k_out_of_range_is_refused_at_once_naming_the_range(explainer: Explainer, k: int) -> None:
    assert explainer.n_train == 32  # two classes of 16
    start = time.monotonic()
    with pytest.raises(InfluenceExplorerError, match=r"choose k from 3 .* to 32"):
        explainer.verify(test_index=0, k=k)
    with pytest.raises(InfluenceExplorerError, match=r"choose k from 3 .* to 32"):
        explainer.verify_many([0, 1], k=k)
    assert time.monotonic() - start < 2


def test_k_equal_to_the_training_set_is_accepted(explainer: Explainer) -> None:
    result = explainer.verify(test_index=0, k=explainer.n_train)
    assert all(len(v.train_indices) == explainer.n_train for v in result.values())


def test_a_class_with_one_training_image_is_warned_about(
    tiny: Dataset, store: ArtifactStore
) -> None:
    # The tiny demo's first two classes, with only one Pullover left for training.
    pullover = int(np.flatnonzero(tiny.train_labels == 1)[0])
    keep = sorted([*np.flatnonzero(tiny.train_labels == 0).tolist(), pullover])
    test_rows = np.flatnonzero(tiny.test_labels < 2)
    lonely = Dataset(
        name="one pullover",
        class_names=tiny.class_names[:2],
        light_on_dark=True,
        train_images=tiny.train_images[keep],
        train_labels=tiny.train_labels[keep],
        train_ids=tiny.train_ids[keep],
        test_images=tiny.test_images[test_rows],
        test_labels=tiny.test_labels[test_rows],
        test_ids=tiny.test_ids[test_rows],
    )
    # λ given: cross-validating it needs 5 images per class and says so (a message of its own).
    built = Explainer(lonely, ExplainerConfig(logreg_l2=1e-3), store=store).prepare()
    name = tiny.class_names[1]
    assert built.warnings[0] == (
        f"Class {name!r} has only 1 training image: influence scores and their verification "
        f"mean little below {MIN_TRAIN_PER_CLASS} per class. Add images to the class, or choose "
        "classes with more."
    )
    assert not any(tiny.class_names[0] in w for w in built.warnings)
