"""The per-upload explanation path against the straightforward computation it replaced: every
model's scores, prediction, loss, top k, pixel and feature distances and familiarity, on a tiny
slice of the demo with the real offline backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.explainer import (
    PIXEL_STEP,
    Explainer,
    ExplainerConfig,
    exact_pixel_distances,
    squared_norms,
)
from core.store import ArtifactStore
from tests.core.test_explainer import _tiny_demo


@pytest.fixture(scope="module")
def explainer(tmp_path_factory):
    store = ArtifactStore(tmp_path_factory.mktemp("cache"))
    return Explainer(_tiny_demo(), ExplainerConfig(logreg_l2=1e-3), store=store).prepare()


def _direct(explainer: Explainer, image: np.ndarray, k: int, estimate: str | None) -> dict:
    """Each model's explanation of an uploaded image as explain computed it before it was made
    to read the training data once per model: a transform per use, n x D and n x d differences,
    full sorts."""
    n = explainer.n_train
    pixels = explainer.dataset.train_images.reshape(n, -1) / 127.5 - 1
    query = image.reshape(-1) / 127.5 - 1
    out = {"pixel_distances": np.linalg.norm(pixels - query, axis=1)}
    for key, fitted in explainer.models.items():
        model, engine = fitted.model, fitted.engine
        inputs = fitted.inputs(image[None])
        label = int(model.predict(inputs)[0])
        used = engine.default_estimate if estimate is None else estimate
        scores = engine.influence_scores(inputs, [label], estimate=used)[0]
        features = model.transform(inputs)
        order = np.argsort(-scores, kind="stable")[:k]
        reverse = np.argsort(scores, kind="stable")[:k]
        out[key] = {
            "label": label,
            "scores": scores,
            "probabilities": model.predict_proba(inputs)[0],
            "loss": float(model.per_example_losses(model.transform(inputs), [label])[0]),
            "feature_distances": torch.linalg.norm(model.features_ - features, dim=1).numpy(),
            "familiarity": fitted.familiarity.check(features)[0],
            "helpful": [int(j) for j in order if scores[j] > 0],
            "harmful": [int(j) for j in reverse if scores[j] < 0],
        }
    return out


@pytest.mark.parametrize(
    ("source", "estimate"),
    [("test", None), ("test", "corrected"), ("test", "first_order"), ("train", None)],
)
def test_an_upload_is_explained_as_the_direct_computation_would(explainer, source, estimate):
    # An upload that is a training image is the hard case for distances (a zero among them).
    image = (explainer.dataset.test_images if source == "test" else explainer.dataset.train_images)[
        3
    ].copy()
    k = 5
    found = explainer.explain(image=image, k=k, estimate=estimate)
    expected = _direct(explainer, image, k, estimate)
    for key, model in found.models.items():
        want = expected[key]
        assert model.explained_label == want["label"]
        # Scores: the same algebra on the same features, so equal to rounding (in fact bitwise).
        np.testing.assert_allclose(model.scores, want["scores"], rtol=1e-10, atol=0)
        np.testing.assert_array_equal(model.probabilities, want["probabilities"])
        assert model.loss == want["loss"]
        assert [item.train_index for item in model.helpful] == want["helpful"]
        assert [item.train_index for item in model.harmful] == want["harmful"]
        # Distances from the expansion are within DISTANCE_RTOL / 2 of the direct formula's.
        np.testing.assert_allclose(
            model.feature_distances, want["feature_distances"], rtol=5e-9, atol=0
        )
        assert model.familiarity == want["familiarity"]
        np.testing.assert_allclose(model.pixel_distances, expected["pixel_distances"], rtol=1e-14)
    # Pixel distances are exact: the integer sum of squared intensity differences.
    n = explainer.n_train
    intensities = explainer.dataset.train_images.reshape(n, -1).astype(np.int64)
    steps = ((intensities - image.reshape(-1).astype(np.int64)) ** 2).sum(1)
    exact = np.sqrt(steps.astype(np.float64)) / PIXEL_STEP
    for model in found.models.values():
        np.testing.assert_array_equal(model.pixel_distances, exact)
    if source == "train":
        assert model.pixel_distances[3] == 0.0


def test_a_test_image_by_index_gets_the_uploads_numbers(explainer):
    image = explainer.dataset.test_images[3].copy()
    by_index = explainer.explain(test_index=3, k=5, target="predicted")
    uploaded = explainer.explain(image=image, k=5)
    same_inputs = 0
    for key, model in by_index.models.items():
        fitted = explainer.models[key]
        np.testing.assert_array_equal(model.pixel_distances, uploaded.models[key].pixel_distances)
        # The backbone's float32 features of one image differ from those of the test split's
        # batches in the last bits; where the inputs are the same, so is everything else.
        if torch.equal(fitted.inputs(image[None]), fitted.test_inputs[3:4]):
            same_inputs += 1
            np.testing.assert_array_equal(model.scores, uploaded.models[key].scores)
            np.testing.assert_array_equal(
                model.feature_distances, uploaded.models[key].feature_distances
            )
    assert same_inputs >= 1  # the SVM's pixels at least


def test_the_engine_takes_the_query_features_instead_of_forming_them_again(explainer):
    for fitted in explainer.models.values():
        inputs = fitted.test_inputs[:3]
        labels = explainer.test_labels[:3]
        features = fitted.model.transform(inputs)
        given = fitted.engine.score_estimates(inputs, labels, features=features)
        formed = fitted.engine.score_estimates(inputs, labels)
        for estimate in fitted.engine.estimates:
            np.testing.assert_array_equal(given[estimate], formed[estimate])


def test_every_stage_of_an_explanation_is_timed(explainer):
    explanation = explainer.explain(image=explainer.dataset.test_images[0].copy(), k=3)
    names = [stage.name for stage in explanation.stages]
    assert names[0].startswith("SVM: ") and "pixel distances to every training image" in names
    for fitted in explainer.models.values():
        for part in ("model features", "influence of every training image", "feature distances"):
            assert any(
                name.startswith(f"{fitted.short_label}: ") and part in name for name in names
            )
    assert 0 < sum(stage.seconds for stage in explanation.stages) <= explanation.seconds


@pytest.mark.parametrize("shape", [(28, 28, 1), (64, 64, 3), (256, 256, 3)])
def test_pixel_distances_are_the_direct_formulas_at_every_image_size(shape):
    # Up to about 180,000 values the integer route, exact; 256 x 256 x 3 is past the size where
    # the expansion's rounding bound reaches half an intensity unit, so every row is formed
    # directly.
    rng = np.random.default_rng(0)
    size = int(np.prod(shape))
    intensities = rng.integers(0, 256, size=(300 if size < 20_000 else 12, size))
    intensities[5, :] = 0  # the query, black, and the farthest image from it
    intensities[7] = intensities[5]  # a duplicate
    intensities[10, :] = 255  # white
    query_intensities = intensities[5].copy()
    train = torch.as_tensor(intensities / PIXEL_STEP - 1.0)
    query = torch.as_tensor(query_intensities / PIXEL_STEP - 1.0)
    found = exact_pixel_distances(train, squared_norms(train), query)
    direct = np.linalg.norm(train.numpy() - query.numpy(), axis=1)
    np.testing.assert_allclose(found, direct, rtol=1e-14)
    assert found[5] == found[7] == 0.0
    if size < 180_000:
        steps = ((intensities - query_intensities) ** 2).sum(1).astype(np.float64)
        np.testing.assert_array_equal(found, np.sqrt(steps) / PIXEL_STEP)
    else:
        np.testing.assert_array_equal(found, torch.linalg.norm(train - query, dim=1).numpy())
