"""The out-of-distribution check: its statistic against brute force, and on the demo, what it
flags (a cat photo, a drawn digit, random noise) and what it does not (test images, clothes)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from core.data import load_demo
from core.errors import InfluenceExplorerError
from core.explainer import Explainer
from core.images import decode_upload
from core.ood import NeighbourDistance
from core.store import ArtifactStore
from tests.prepared_cache import REPO, cache_dir, prepare_default_explainer

PHOTOS = REPO / "tests" / "assets" / "photos"


def test_statistic_is_the_kth_neighbour_distance():
    rng = np.random.default_rng(0)
    train, reference, queries = (
        rng.normal(size=(50, 4)),
        rng.normal(size=(30, 4)),
        rng.normal(size=(7, 4)),
    )
    check = NeighbourDistance(train, reference, k=3, chunk=4)
    brute = np.sort(np.linalg.norm(queries[:, None] - train[None], axis=2), axis=1)[:, 2]
    np.testing.assert_allclose(check.statistics(queries), brute, rtol=1e-9)
    results = check.check(queries)
    ref = np.sort(np.sort(np.linalg.norm(reference[:, None] - train[None], axis=2), axis=1)[:, 2])
    for value, result in zip(brute, results, strict=True):
        assert result.threshold == pytest.approx(ref[-1])
        assert result.percentile == pytest.approx(100 * np.mean(ref <= value))
        assert result.unusual == (value > ref[-1])


def test_far_points_are_flagged_and_near_ones_are_not():
    rng = np.random.default_rng(1)
    train, reference = rng.normal(size=(200, 3)), rng.normal(size=(100, 3))
    check = NeighbourDistance(train, reference)
    near, far = check.check(np.array([[0.1, 0.0, -0.2], [8.0, 8.0, 8.0]]))
    assert not near.unusual and near.ratio < 1
    assert far.unusual and far.ratio > 2 and far.percentile == 100
    assert "unlike the training data" in far.message("Model") and "2.0" not in near.message("M")


def test_bad_shapes_are_refused():
    with pytest.raises(InfluenceExplorerError, match="reference_features"):
        NeighbourDistance(np.zeros((5, 3)), np.zeros((4, 2)))
    with pytest.raises(InfluenceExplorerError, match="held-out"):
        NeighbourDistance(np.zeros((5, 3)), np.zeros((0, 3)))


@pytest.fixture(scope="module")
def demo_explainer() -> Explainer:
    directory = cache_dir()
    prepare_default_explainer(directory)
    return Explainer(load_demo(), store=ArtifactStore(directory)).prepare()


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _jpeg(pixels: np.ndarray, size: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).resize((size, size), Image.BILINEAR).save(out, "JPEG", quality=70)
    return out.getvalue()


def _decoded(explainer: Explainer, data: bytes) -> np.ndarray:
    dataset = explainer.dataset
    return np.asarray(
        decode_upload(
            data, target_shape=dataset.image_shape, light_on_dark=dataset.light_on_dark
        ).image
    )


def _flags(explainer: Explainer, image: np.ndarray) -> dict[str, bool]:
    explanation = explainer.explain(image=image, k=3)
    return {key: m.familiarity.unusual for key, m in explanation.models.items()}


@pytest.mark.slow
def test_demo_flags_what_is_not_clothing(demo_explainer, report):
    digit = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(digit).line([(6, 6), (22, 6), (12, 24)], fill=255, width=3)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    unlike = {
        "cat photo": (PHOTOS / "cat.jpg").read_bytes(),
        "drawn digit 7": _png(digit),
        "random noise": _png(noise),
    }
    for name, data in unlike.items():
        explanation = demo_explainer.explain(image=_decoded(demo_explainer, data), k=3)
        flagged = [m.label for m in explanation.models.values() if m.familiarity.unusual]
        report(
            f"OOD {name}: "
            + ", ".join(
                f"{m.key} ratio {m.familiarity.ratio:.2f}" for m in explanation.models.values()
            )
        )
        assert flagged, f"{name} was not flagged by any model"
        assert explanation.warnings and "unlike the training data" in explanation.warnings[0]


@pytest.mark.slow
def test_demo_does_not_flag_clothes(demo_explainer):
    for index in (0, 17, 123):
        explanation = demo_explainer.explain(test_index=index, k=3)
        assert not explanation.warnings
    # Tops, as uploaded files (PNG, and an enlarged JPEG), are like the training data. (Shoes
    # and bags are partly flagged by this T-shirt/top vs Shirt model, rightly: its training data
    # has none.)
    full = load_demo()
    for label in (0, 2, 4, 6):  # T-shirt/top, Pullover, Coat, Shirt
        for image in full.test_images[full.test_labels == label][:3]:
            for upload in (_png(Image.fromarray(image[..., 0])), _jpeg(image[..., 0], 112)):
                flags = _flags(demo_explainer, _decoded(demo_explainer, upload))
                assert not any(flags.values()), (label, flags)


def test_query_gives_every_distance_and_the_checks_familiarity():
    # Features far from the origin (norm ~1e4) and a near-duplicate 1e-3 away, where the
    # expansion ‖a‖² + ‖b‖² - 2aᵀb cancels to ~1e-8 relative of the terms: those rows must come
    # out of the direct formula, the rest stay within DISTANCE_RTOL of it.
    from core.ood import DISTANCE_RTOL

    rng = np.random.default_rng(3)
    train = 1e4 + rng.normal(size=(400, 16))
    point = train[7] + 1e-3 * rng.normal(size=16)
    train[9] = point  # an exact duplicate
    check = NeighbourDistance(train, 1e4 + rng.normal(size=(50, 16)), k=5, chunk=64)
    result = check.query(point[None])
    direct = np.linalg.norm(train - point, axis=1)
    assert result.distances[9] == 0.0
    np.testing.assert_allclose(result.distances, direct, rtol=DISTANCE_RTOL / 2, atol=0)
    assert result.familiarity == check.check(point[None])[0]
