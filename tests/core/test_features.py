"""Featurizers: agreement of transform and torch_forward, batching, gradients, ImageNet checks, caching."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from core import allocator
from core import features as features_module
from core.errors import BackboneUnavailableError, DatasetError, NonFiniteFeaturesError
from core.features import (
    EfficientNetLite0Featurizer,
    Featurizer,
    InceptionV3Featurizer,
    PixelFeaturizer,
    available_backbones,
    cached_features,
    features_cache_key,
    get_featurizer,
    imagenet_class_names,
    inception_hub_path,
)
from core.store import ArtifactStore

PHOTOS = Path(__file__).resolve().parents[1] / "assets" / "photos"
INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"


def make_images(n: int, size: int = 28, channels: int = 1, seed: int = 0) -> np.ndarray:
    """(n, size, size, channels) uint8 with structure (a blob) plus noise, like small photos."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    blob = np.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.08)
    base = 255 * blob[None, :, :, None] * rng.uniform(0.3, 1.0, size=(n, 1, 1, channels))
    noisy = base + rng.normal(0, 25, size=(n, size, size, channels))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def load_photo(name: str) -> np.ndarray:
    """(1, H, W, 3) uint8, the whole photo (the featurizer does the resizing)."""
    return np.asarray(Image.open(PHOTOS / name).convert("RGB"))[None]


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0Featurizer:
    featurizer = EfficientNetLite0Featurizer()
    featurizer.load()
    return featurizer


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision-layout Inception v3 state dict with random weights (tests never download)."""
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception(inception_weights: Path) -> InceptionV3Featurizer:
    featurizer = InceptionV3Featurizer(inception_weights)
    featurizer.load()
    return featurizer


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No Inception weights anywhere, and any download attempt fails the test."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delenv("INFLUENCE_INCEPTION_WEIGHTS", raising=False)

    def no_download(*_args: object, **_kwargs: object) -> None:
        pytest.fail("a download was attempted without allow_download=True")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return hub


# -- shared interface ------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_lite0_transform_equals_torch_forward(
    lite0: EfficientNetLite0Featurizer, channels: int
) -> None:
    images = make_images(3, channels=channels)
    transformed = lite0.transform(images, batch_size=3)
    assert transformed.shape == (3, 1280) and transformed.dtype == np.float32
    for dtype in (torch.float32, torch.float64):
        forward = lite0.torch_forward(torch.tensor(images, dtype=dtype)).detach().numpy()
        np.testing.assert_array_equal(forward, transformed)


def test_lite0_features_do_not_depend_on_batch_size(lite0: EfficientNetLite0Featurizer) -> None:
    images = make_images(8, seed=1)
    reference = lite0.transform(images, batch_size=8)
    for batch_size in (1, 3):
        np.testing.assert_allclose(
            lite0.transform(images, batch_size=batch_size), reference, rtol=1e-5, atol=1e-5
        )


def test_lite0_in_place_forward_pass_gives_the_same_bits_and_keeps_the_input(
    lite0: EfficientNetLite0Featurizer,
) -> None:
    # Without an autograd graph ReLU6 and the residual sums work in place; with one they do not.
    pixels = torch.tensor(make_images(4, seed=5), dtype=torch.float32)
    before = pixels.clone()
    with torch.no_grad():
        in_place = lite0.torch_forward(pixels)
    recorded = lite0.torch_forward(pixels.clone().requires_grad_(True))
    assert recorded.requires_grad
    torch.testing.assert_close(in_place, recorded.detach(), rtol=0, atol=0)
    assert torch.equal(pixels, before)


def test_lite0_batches_of_its_own_size_by_default(lite0: EfficientNetLite0Featurizer) -> None:
    calls: list[tuple[int, int]] = []
    images = make_images(10, seed=2)
    features = lite0.transform(images, progress=lambda done, total: calls.append((done, total)))
    assert lite0.batch_size == 8 and calls == [(8, 10), (10, 10)]
    np.testing.assert_allclose(
        features, lite0.transform(images, batch_size=10), rtol=1e-5, atol=1e-5
    )


def test_activations_from_the_heap_change_no_feature_and_are_undone(
    lite0: EfficientNetLite0Featurizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = make_images(20, seed=4)
    assert lite0.reuses_activations
    calls: list[tuple[int, int]] = []
    libc = allocator.libc()
    if libc is not None:  # glibc: record what is set, and set it

        class Recording:
            def mallopt(self, parameter: int, value: int) -> int:
                calls.append((parameter, value))
                return libc.mallopt(parameter, value)

            def malloc_trim(self, pad: int) -> int:
                calls.append((0, pad))
                return libc.malloc_trim(pad)

        monkeypatch.setattr(allocator, "libc", lambda: Recording())
    from_heap = lite0.transform(images)
    with monkeypatch.context() as patch:
        patch.setattr(lite0, "reuses_activations", False)
        mapped = lite0.transform(images)
    np.testing.assert_array_equal(from_heap, mapped)
    assert allocator.heap_users() == 0
    if libc is not None:  # on for the batches, then the resting thresholds, then trimmed
        mmap_rest, trim_rest = allocator.resting_thresholds()
        assert calls == [
            (allocator.M_MMAP_THRESHOLD, 2**30),
            (allocator.M_TRIM_THRESHOLD, 2**31 - 1),
            (allocator.M_TRIM_THRESHOLD, trim_rest),
            (allocator.M_MMAP_THRESHOLD, mmap_rest),
            (0, 0),
        ]
    # Nested (two threads featurising at once): undone when the last one ends.
    with allocator.activations_from_the_heap():
        with allocator.activations_from_the_heap():
            assert allocator.heap_users() == 2
        assert allocator.heap_users() == 1
    assert allocator.heap_users() == 0


def test_lite0_at_another_input_size_is_another_featurizer() -> None:
    default = EfficientNetLite0Featurizer()
    assert EfficientNetLite0Featurizer(input_size=224).version == default.version
    small = EfficientNetLite0Featurizer(input_size=112)
    assert small.input_size == 112 and "resize112" in small.version
    assert small.version != default.version and "112x112" in small.label
    images = make_images(2, seed=3)
    features = small.transform(images)
    assert features.shape == (2, 1280) and np.isfinite(features).all()
    assert not np.allclose(features, default.transform(images))
    keys = {
        features_cache_key(f, images, dataset_hash="d", part="train/class0")
        for f in (default, small)
    }
    assert len(keys) == 2
    for bad in (16, 0, 112.0, True):
        with pytest.raises(BackboneUnavailableError, match="input_size"):
            EfficientNetLite0Featurizer(input_size=bad)


def test_progress_is_reported_after_each_batch(lite0: EfficientNetLite0Featurizer) -> None:
    calls: list[tuple[int, int]] = []
    lite0.transform(
        make_images(7), batch_size=3, progress=lambda done, total: calls.append((done, total))
    )
    assert calls == [(3, 7), (6, 7), (7, 7)]


def test_lite0_gradient_reaches_the_pixels(lite0: EfficientNetLite0Featurizer) -> None:
    pixels = torch.tensor(make_images(2), dtype=torch.float64, requires_grad=True)
    direction = torch.randn(2, 1280, generator=torch.Generator().manual_seed(0))
    (lite0.torch_forward(pixels) * direction).sum().backward()
    grad = pixels.grad
    assert grad.shape == pixels.shape and grad.dtype == torch.float64
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0
    assert (grad[0].abs().sum() > 0) and (grad[1].abs().sum() > 0)


def test_lite0_weights_are_frozen_and_the_model_is_in_eval_mode(
    lite0: EfficientNetLite0Featurizer,
) -> None:
    network = lite0.load()
    assert not network.training
    assert not any(p.requires_grad for p in network.parameters())
    assert lite0.load() is network, "weights are loaded once"


def test_lite0_accepts_other_image_sizes(lite0: EfficientNetLite0Featurizer) -> None:
    for size in (32, 224, 250):
        assert lite0.transform(make_images(1, size=size, channels=3)).shape == (1, 1280)


def test_pixels_are_scaled_to_minus_one_one_and_flattened() -> None:
    featurizer = PixelFeaturizer()
    images = np.array([[[[0], [255]], [[127], [128]]]], dtype=np.uint8)  # (1, 2, 2, 1)
    features = featurizer.transform(images)
    assert features.dtype == np.float64 and features.shape == (1, 4)
    np.testing.assert_allclose(features[0], [-1.0, 1.0, 127 / 127.5 - 1, 128 / 127.5 - 1])
    rgb = make_images(3, size=5, channels=3)
    out = featurizer.transform(rgb, batch_size=2)
    assert out.shape == (3, 75) and out.min() >= -1.0 and out.max() <= 1.0
    assert featurizer.output_dim(rgb.shape[1:]) == 75
    # H, W, C order, so a feature index maps back to a pixel for heatmaps.
    np.testing.assert_array_equal(out.reshape(3, 5, 5, 3), rgb / 127.5 - 1)


def test_pixels_transform_equals_torch_forward_and_has_gradient() -> None:
    featurizer = PixelFeaturizer()
    images = make_images(3)
    pixels = torch.tensor(images, dtype=torch.float64, requires_grad=True)
    features = featurizer.torch_forward(pixels)
    np.testing.assert_array_equal(features.detach().numpy(), featurizer.transform(images))
    features.sum().backward()
    np.testing.assert_allclose(pixels.grad.numpy(), np.full(images.shape, 1 / 127.5))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 28, 28), dtype=np.uint8),
        np.zeros((2, 28, 28, 4), dtype=np.uint8),
        np.zeros((2, 28, 28, 1), dtype=np.float32),
    ],
    ids=["no-channel-axis", "rgba", "float"],
)
def test_wrong_image_arrays_are_refused_with_advice(bad: np.ndarray) -> None:
    with pytest.raises(DatasetError, match=r"\(N, H, W, C\)|uint8"):
        PixelFeaturizer().transform(bad)


def test_empty_input_gives_empty_features(lite0: EfficientNetLite0Featurizer) -> None:
    calls: list[tuple[int, int]] = []
    out = lite0.transform(make_images(0), progress=lambda d, t: calls.append((d, t)))
    assert out.shape == (0, 1280) and calls == []


# -- real ImageNet weights -------------------------------------------------------------------------


def test_lite0_weights_are_real_imagenet_weights(lite0: EfficientNetLite0Featurizer) -> None:
    """Measured: cat -> Egyptian cat 0.82, tiger cat 0.08, tabby 0.06; coffee -> espresso 0.81."""
    names = imagenet_class_names()
    cat_classes = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
    cat = torch.softmax(torch.from_numpy(lite0.classify(load_photo("cat.jpg"))), dim=1)[0]
    coffee = torch.softmax(torch.from_numpy(lite0.classify(load_photo("coffee.jpg"))), dim=1)[0]
    top_cat = cat.topk(5).indices.tolist()
    top_coffee = coffee.topk(5).indices.tolist()
    print("cat:", [(names[i], round(float(cat[i]), 3)) for i in top_cat])
    print("coffee:", [(names[i], round(float(coffee[i]), 3)) for i in top_coffee])

    # All three domestic-cat classes lead, together holding most of the probability.
    assert set(top_cat[:3]) == cat_classes
    assert float(cat[list(cat_classes)].sum()) > 0.8
    assert names[967] == "espresso"
    assert top_coffee[0] == 967 and float(coffee[967]) > 0.5
    # Cup (968) and coffee mug (504) follow among the top five.
    assert {968, 504} <= set(top_coffee)


# -- Inception v3 (random weights in the torchvision layout; never downloaded) ---------------------


def test_inception_loads_a_weights_file_and_gives_2048_finite_features_with_gradients(
    inception: InceptionV3Featurizer,
) -> None:
    # One test for shape, transform == torch_forward and gradients: each 299x299 pass costs seconds.
    images = make_images(2, channels=1)
    features = inception.transform(images, batch_size=2)
    assert features.shape == (2, 2048) and features.dtype == np.float32
    assert np.isfinite(features).all()
    assert len(inception.weights_id) == 16
    pixels = torch.tensor(images, dtype=torch.float64, requires_grad=True)
    forward = inception.torch_forward(pixels)
    np.testing.assert_array_equal(forward.detach().numpy(), features)
    forward.sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


def test_inception_preprocessing_matches_torchvision_imagenet_pipeline(
    inception: InceptionV3Featurizer, inception_weights: Path
) -> None:
    """Ours: transform_input=False on (x/255-0.5)/0.5. torchvision's IMAGENET1K_V1 route:
    mean/std normalisation, then transform_input=True. Same weights must give the same features."""
    image = make_images(1, size=299, channels=3, seed=3)
    ours = inception.transform(image)

    reference = torchvision.models.inception_v3(
        weights=None, aux_logits=True, init_weights=False, transform_input=True
    )
    reference.load_state_dict(torch.load(inception_weights, weights_only=True))
    reference.fc = torch.nn.Identity()
    reference.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        theirs = reference((x - mean) / std).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_inception_is_found_in_torchvision_hub_cache(
    inception_weights: Path, empty_hub: Path
) -> None:
    cached = empty_hub / "checkpoints" / INCEPTION_FILE
    assert inception_hub_path() == cached
    cached.parent.mkdir(parents=True)
    cached.symlink_to(inception_weights)
    status = {s.name: s for s in available_backbones()}["inception-v3"]
    assert status.available and "hub cache" in status.reason
    assert InceptionV3Featurizer().weights_path() == cached


def test_inception_weights_from_environment_variable(
    inception_weights: Path, empty_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFLUENCE_INCEPTION_WEIGHTS", str(inception_weights))
    assert InceptionV3Featurizer().weights_path() == inception_weights
    assert {s.name: s for s in available_backbones()}["inception-v3"].available


def test_inception_downloads_only_when_allowed(
    inception_weights: Path, empty_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests: list[tuple[str, str, str | None]] = []

    def fake_download(url: str, dst: str, hash_prefix: str | None = None, **_: object) -> None:
        requests.append((url, dst, hash_prefix))
        shutil.copyfile(inception_weights, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    featurizer = InceptionV3Featurizer(allow_download=True)
    assert requests == []  # nothing is fetched until the weights are needed
    featurizer.load()
    target = empty_hub / "checkpoints" / INCEPTION_FILE
    assert requests == [
        (torchvision.models.Inception_V3_Weights.IMAGENET1K_V1.url, str(target), "0cc3c7bd")
    ]


def test_inception_without_weights_says_how_to_provide_them(empty_hub: Path) -> None:
    with pytest.raises(BackboneUnavailableError) as raised:
        InceptionV3Featurizer()
    message = str(raised.value)
    expected_path = str(empty_hub / "checkpoints" / INCEPTION_FILE)
    for hint in (
        "--inception-weights PATH",
        "INFLUENCE_INCEPTION_WEIGHTS",
        expected_path,
        "https://download.pytorch.org/models/" + INCEPTION_FILE,
        "efficientnet-lite0",
    ):
        assert hint in message
    with pytest.raises(BackboneUnavailableError):
        get_featurizer("inception-v3")
    status = {s.name: s for s in available_backbones()}["inception-v3"]
    assert not status.available and expected_path in status.reason


@pytest.fixture
def damaged_weight_files(inception_weights: Path, tmp_path: Path, lite0) -> dict[str, Path]:
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(inception_weights.read_bytes()[:100_000])
    other_architecture = tmp_path / "lite0.pth"
    shutil.copyfile(lite0.weights_path(), other_architecture)
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], not_a_state_dict)
    pickled_model = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), pickled_model)
    return {
        "truncated": truncated,
        "other-architecture": other_architecture,
        "not-a-state-dict": not_a_state_dict,
        "pickled-model": pickled_model,
        "missing": tmp_path / "does-not-exist.pth",
    }


@pytest.mark.parametrize(
    "which", ["truncated", "other-architecture", "not-a-state-dict", "pickled-model", "missing"]
)
def test_bad_inception_file_raises_with_path_and_advice(
    which: str, damaged_weight_files: dict[str, Path], empty_hub: Path
) -> None:
    path = damaged_weight_files[which]
    with pytest.raises(BackboneUnavailableError) as raised:
        InceptionV3Featurizer(path).load()
    message = str(raised.value)
    assert str(path) in message
    assert "INFLUENCE_INCEPTION_WEIGHTS" in message


# -- registry --------------------------------------------------------------------------------------


def test_registry_builds_by_name_and_lists_names_on_typo() -> None:
    assert isinstance(get_featurizer("pixels"), PixelFeaturizer)
    lite = get_featurizer("efficientnet-lite0")
    assert (lite.name, lite.dim, lite.label) == (
        "efficientnet-lite0",
        1280,
        "EfficientNet-Lite0 (ImageNet)",
    )
    with pytest.raises(BackboneUnavailableError) as raised:
        get_featurizer("resnet")
    for name in ("pixels", "efficientnet-lite0", "inception-v3"):
        assert name in str(raised.value)


def test_available_backbones_is_cheap_and_complete(
    empty_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_args: object, **_kwargs: object) -> None:
        pytest.fail("available_backbones must not load weights")

    monkeypatch.setattr(torch, "load", fail)
    statuses = available_backbones()
    assert [s.name for s in statuses] == ["pixels", "efficientnet-lite0", "inception-v3"]
    assert [s.available for s in statuses] == [True, True, False]
    given = available_backbones(inception_weights=empty_hub / "nope.pth")[2]
    assert not given.available and "nope.pth" in given.reason


# -- caching ---------------------------------------------------------------------------------------


class CountingPixels(PixelFeaturizer):
    """Pixels, counting transform calls, with a settable version."""

    def __init__(self, version: str = "test-1") -> None:
        self.version = version
        self.calls = 0

    def transform(self, images: np.ndarray, **kwargs: object) -> np.ndarray:
        self.calls += 1
        return super().transform(images, **kwargs)


def test_cached_features_reuse_the_store_and_follow_the_version(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "cache")
    images = make_images(5)
    featurizer = CountingPixels()
    progress: list[tuple[int, int]] = []

    first = cached_features(
        store,
        featurizer,
        images,
        dataset_hash="d1",
        part="train/class3",
        progress=lambda d, t: progress.append((d, t)),
    )
    second = cached_features(store, featurizer, images, dataset_hash="d1", part="train/class3")
    assert featurizer.calls == 1 and progress == [(5, 5)]
    np.testing.assert_array_equal(first, second)
    assert second.dtype == np.float64

    featurizer.version = "test-2"  # preprocessing changed: old features must not be used
    cached_features(store, featurizer, images, dataset_hash="d1", part="train/class3")
    assert featurizer.calls == 2

    # Another part or other images under the same part name are separate entries too.
    cached_features(store, featurizer, images, dataset_hash="d1", part="train/class4")
    cached_features(store, featurizer, images[:3], dataset_hash="d1", part="train/class4")
    assert featurizer.calls == 4
    assert len(list(store.root.glob("features-*.artifact"))) == 4


def test_cached_features_recompute_inconsistent_entries(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "cache")
    images = make_images(4)
    featurizer = CountingPixels()
    key = features_module.features_cache_key(featurizer, images, dataset_hash="d", part="p")
    store.save(key, {"features": np.zeros((3, 2))})  # intact file, wrong shape
    features = cached_features(store, featurizer, images, dataset_hash="d", part="p")
    assert featurizer.calls == 1 and features.shape == (4, 784)


def test_cached_features_with_non_finite_values_are_recomputed(tmp_path: Path) -> None:
    # A file whose checksum is fine but whose values no model can use (e.g. written by an older,
    # buggy version) is not trusted: recomputed, and replaced on disk.
    store = ArtifactStore(tmp_path / "cache")
    images = make_images(4)
    featurizer = CountingPixels()
    key = features_module.features_cache_key(featurizer, images, dataset_hash="d", part="p")
    poisoned = featurizer.transform(images)
    poisoned[1, 5] = np.nan
    poisoned[2, 0] = np.inf
    store.save(key, {"features": poisoned})
    features = cached_features(store, featurizer, images, dataset_hash="d", part="p")
    assert featurizer.calls == 2 and np.isfinite(features).all()
    assert np.isfinite(store.load(key)["features"]).all()


class NaNPixels(PixelFeaturizer):
    """A featurizer gone wrong (as damaged weights would make it): NaN for one image."""

    def transform(self, images: np.ndarray, **kwargs: object) -> np.ndarray:
        features = super().transform(images, **kwargs)
        features[len(features) // 2, :3] = np.nan
        return features


def test_non_finite_features_are_refused_with_advice_and_not_cached(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "cache")
    images = make_images(6)
    with pytest.raises(NonFiniteFeaturesError, match="1 of 6 images") as refused:
        cached_features(store, NaNPixels(), images, dataset_hash="d", part="train/class0")
    message = str(refused.value)
    assert "train/class0" in message and "row 3" in message
    assert "choose another backbone" in message
    assert not list(store.root.glob("features-*.artifact"))


def test_featurizer_interface_is_abstract() -> None:
    with pytest.raises(TypeError):
        Featurizer()  # type: ignore[abstract]
