"""End-to-end explanations on a tiny slice of the demo, with the real offline backbone."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core import store as store_module
from core.data import Dataset, load_demo
from core.errors import (
    BackboneUnavailableError,
    InfluenceExplorerError,
    NonFiniteFeaturesError,
    SolverDivergedError,
)
from core.explainer import (
    LOGREG_L2_GRID,
    Explainer,
    ExplainerConfig,
    default_classes,
    first_look_config,
)
from core.influence import LiSSAWarning, SolverConfig
from core.store import ArtifactStore, CacheKey
from tests.core.test_store import DAMAGE


def _tiny_demo(per_class_train: int = 16, per_class_test: int = 4) -> Dataset:
    demo = load_demo()
    keep_classes = [0, 2, 6]  # T-shirt/top, Pullover, Shirt: a third class to be left out
    parts = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = getattr(demo, f"{split}_labels")
        rows = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in keep_classes])
        rows.sort()
        parts[f"{split}_images"] = getattr(demo, f"{split}_images")[rows]
        parts[f"{split}_labels"] = np.searchsorted(keep_classes, labels[rows])
        parts[f"{split}_ids"] = getattr(demo, f"{split}_ids")[rows]
    return Dataset(
        name="tiny demo",
        class_names=[demo.class_names[c] for c in keep_classes],
        light_on_dark=True,
        **parts,
    )


@pytest.fixture(scope="module")
def tiny():
    return _tiny_demo()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return ArtifactStore(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def explainer(tiny, store):
    reports = []
    built = Explainer(tiny, store=store).prepare(lambda *report: reports.append(report))
    built.reports = reports
    built.stages = [stage for stage, _, _ in reports]
    return built


def test_default_pair_and_summaries(tiny, explainer):
    assert default_classes(tiny) == (0, 2)  # T-shirt/top and Shirt in the tiny dataset
    assert explainer.class_names == ("T-shirt/top", "Shirt")
    assert explainer.n_train == 32 and explainer.n_test == 8
    summaries = explainer.summaries()
    assert set(summaries) == {"svm", "logreg"}
    for summary in summaries.values():
        assert 0.0 <= summary.test_accuracy <= 1.0 and summary.gradient_norm <= 1e-8
    chosen = summaries["logreg"].hyperparameters["l2"]
    curve = summaries["logreg"].lambda_curve
    assert summaries["svm"].lambda_curve is None
    assert curve.grid == LOGREG_L2_GRID and curve.chosen == chosen and curve.n == 32
    # The one-standard-error rule: the largest λ within one s.e. of the lowest held-out log-loss.
    best = int(np.argmin(curve.mean))
    within = [
        g
        for g, m in zip(curve.grid, curve.mean, strict=True)
        if m <= curve.mean[best] + curve.stderr[best]
    ]
    assert curve.best == curve.grid[best] and chosen == max(within)
    assert any("features" in stage for stage in explainer.stages)
    assert any("λ" in stage for stage in explainer.stages)


def test_every_stage_reports_its_start_and_its_end(explainer):
    # A stage's first report has nothing done and its last everything (so a front end, and
    # python -m bench.latency, can time each stage from its start), in one run per stage.
    runs = [[explainer.reports[0]]]
    for report in explainer.reports[1:]:
        if report[0] == runs[-1][-1][0]:
            runs[-1].append(report)
        else:
            runs.append([report])
    assert len({run[0][0] for run in runs}) == len(runs)
    for run in runs:
        (stage, first, _), (_, last, total) = run[0], run[-1]
        assert first == 0 and last == total > 0, stage
    names = [run[0][0] for run in runs]
    for key in ("features: train", "features: test", "λ", "test predictions and familiarity"):
        assert any(key in name for name in names), key


def test_explain_a_test_image(explainer):
    explanation = explainer.explain(test_index=1, k=5)
    assert explanation.true_label == int(explainer.test_labels[1])
    assert explanation.image.shape == (28, 28, 1)
    pixels = explainer.dataset.train_images.reshape(32, -1) / 127.5 - 1
    query = explanation.image.reshape(-1) / 127.5 - 1
    for key, model in explanation.models.items():
        assert model.scores.shape == (32,)
        assert model.explained_label == explanation.true_label
        np.testing.assert_allclose(model.pixel_distances, np.linalg.norm(pixels - query, axis=1))
        helpful = [item.score for item in model.helpful]
        harmful = [item.score for item in model.harmful]
        assert helpful == sorted(helpful, reverse=True) and all(s > 0 for s in helpful)
        assert harmful == sorted(harmful) and all(s < 0 for s in harmful)
        assert len(helpful) <= 5 and len(harmful) <= 5
        top = model.helpful[0]
        assert top.score == pytest.approx(model.scores[top.train_index])
        assert top.id == explainer.dataset.train_ids[top.train_index]
        engine = explainer.models[key].engine
        inputs = explainer.models[key].test_inputs[1:2]
        np.testing.assert_allclose(
            model.scores, engine.influence_scores(inputs, [explanation.true_label])[0]
        )
        np.testing.assert_allclose(model.probabilities.sum(), 1.0)


def test_uploaded_image_explains_each_models_prediction(explainer):
    image = explainer.dataset.test_images[2].copy()
    upload = explainer.explain(image=image, k=3)
    assert upload.test_index is None and upload.true_label is None
    same = explainer.explain(test_index=2, k=3, target="predicted")
    for key in ("svm", "logreg"):
        assert upload.models[key].explained_label == upload.models[key].predicted
        np.testing.assert_allclose(
            upload.models[key].scores, same.models[key].scores, rtol=1e-4, atol=1e-9
        )
    with pytest.raises(InfluenceExplorerError, match="no true label"):
        explainer.explain(image=image, target="true")


def test_every_estimate_is_one_click_away_and_labelled(explainer):
    default = explainer.explain(test_index=0).models["logreg"]
    assert default.estimate == "margin"
    corrected = explainer.explain(test_index=0, estimate="corrected").models["logreg"].scores
    first = explainer.explain(test_index=0, estimate="first_order").models["logreg"].scores
    leverage = explainer.models["logreg"].engine.leverage()
    np.testing.assert_allclose(corrected, first / (1 - leverage), rtol=1e-9)
    # Convex loss: the loss at the predicted margin lies on or above its tangent.
    assert np.all(default.scores >= corrected - 1e-15)


def test_heatmaps_through_kernel_and_backbone(explainer):
    j = explainer.explain(test_index=3).models["logreg"].helpful[0].train_index
    svm_map = explainer.heatmap("svm", j, test_index=3)
    engine = explainer.models["svm"].engine
    inputs = explainer.models["svm"].test_inputs[3:4]
    label = int(explainer.test_labels[3])
    expected = engine.perturbation_influence(inputs, [label], [j])[0, 0] / 127.5
    np.testing.assert_allclose(svm_map.reshape(-1), expected, rtol=1e-10, atol=1e-16)

    lr_map = explainer.heatmap("logreg", j, test_index=3)
    assert lr_map.shape == (28, 28, 1) and np.isfinite(lr_map).all() and np.abs(lr_map).max() > 0
    # Chain rule check: the heatmap along a direction equals the feature-space gradient along
    # the change of the backbone's features (a finite difference through the real network).
    fitted = explainer.models["logreg"]
    feature_gradient = fitted.engine.perturbation_influence(fitted.test_inputs[3:4], [label], [j])[
        0, 0
    ]
    image = torch.tensor(explainer.dataset.train_images[j][None], dtype=torch.float64)
    direction = torch.randn(
        image.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    eps = 0.5
    with torch.no_grad():
        plus = fitted.featurizer.torch_forward(image + eps * direction).double()
        minus = fitted.featurizer.torch_forward(image - eps * direction).double()
    finite = float(((plus - minus)[0] / (2 * eps)).numpy() @ feature_gradient)
    assert float((lr_map * direction[0].numpy()).sum()) == pytest.approx(finite, rel=0.05)


def test_verify_retrains_both_models(explainer):
    results = explainer.verify(test_index=1, k=6)
    assert set(results) == {"svm", "logreg"}
    for key, result in results.items():
        assert len(result.train_indices) == 6 and result.converged
        model = explainer.models[key].model
        j = int(result.train_indices[0])
        weights = np.ones(explainer.n_train)
        weights[j] = 0
        refitted = model.refit(sample_weight=weights, tol=1e-11)
        inputs = explainer.models[key].test_inputs[1:2]
        label = [int(explainer.test_labels[1])]
        expected = float(refitted.loss(inputs, label)[0] - model.loss(inputs, label)[0])
        assert result.actual[0] == pytest.approx(expected, rel=1e-6, abs=1e-12)
        assert set(result.agreement) == {"margin", "corrected", "first_order"}
        assert result.selected_by == "margin"


def test_second_build_reads_the_cache(tiny, store, explainer, monkeypatch):
    from core.features import EfficientNetLite0Featurizer

    def no_recompute(*args, **kwargs):
        raise AssertionError("features were recomputed instead of read from the cache")

    monkeypatch.setattr(EfficientNetLite0Featurizer, "transform", no_recompute)
    # λ's cross-validation is cached too (in-process and on a cluster's shards).
    monkeypatch.setattr("core.selection.held_out_values", no_recompute)
    monkeypatch.setattr("core.backend.selection.held_out_values", no_recompute)
    again = Explainer(tiny, store=store).prepare()
    assert again.models["logreg"].lambda_curve == explainer.models["logreg"].lambda_curve
    assert again.models["logreg"].model.fit_info_.iterations <= 1
    np.testing.assert_allclose(
        again.models["logreg"].model.theta_, explainer.models["logreg"].model.theta_, atol=1e-10
    )


def test_bad_queries_and_configs_are_refused(tiny, explainer, store, tmp_path, monkeypatch):
    with pytest.raises(InfluenceExplorerError, match="test_index"):
        explainer.explain(test_index=99)
    with pytest.raises(InfluenceExplorerError, match="exactly one"):
        explainer.explain()
    with pytest.raises(InfluenceExplorerError, match="uint8 of shape"):
        explainer.explain(image=np.zeros((32, 32, 3), dtype=np.uint8))
    with pytest.raises(InfluenceExplorerError, match="model must be"):
        explainer.heatmap("cnn", 0, test_index=0)
    with pytest.raises(InfluenceExplorerError, match="at least two classes"):
        ExplainerConfig(classes=(0,))
    with pytest.raises(InfluenceExplorerError, match="svm_gamma"):
        ExplainerConfig(svm_gamma="widest")
    with pytest.raises(InfluenceExplorerError, match="ImageNet backbone"):
        ExplainerConfig(backbone="pixels")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("INFLUENCE_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(BackboneUnavailableError, match="inception"):
        Explainer(tiny, ExplainerConfig(backbone="inception-v3"), store=store).prepare()


# ---------------------------------------------------------------- faults, damage and races


def test_a_healthy_explainer_has_no_warnings(explainer):
    assert explainer.warnings == ()


def test_lissa_that_cannot_have_converged_is_reported_on_the_explainer(tiny, store):
    short = ExplainerConfig(solver=SolverConfig(method="lissa", lissa_depth=20))
    with pytest.warns(LiSSAWarning):
        built = Explainer(tiny, short, store=store).prepare()
    assert len(built.warnings) == 2  # one per model, each naming it
    assert built.warnings[0].startswith("RBF SVM on pixels: LiSSA")
    assert built.warnings[1].startswith("Logistic regression on")
    assert all("lissa_depth" in message for message in built.warnings)


def test_non_finite_features_of_an_upload_are_refused(explainer, monkeypatch):
    from core.features import EfficientNetLite0Featurizer

    real = EfficientNetLite0Featurizer.transform

    def broken(self, images, **kwargs):
        return np.full_like(real(self, images, **kwargs), np.inf)

    monkeypatch.setattr(EfficientNetLite0Featurizer, "transform", broken)
    with pytest.raises(NonFiniteFeaturesError, match=r"the uploaded image.*another backbone"):
        explainer.explain(image=explainer.dataset.test_images[0].copy())


def test_non_finite_scores_are_refused_not_listed(explainer, monkeypatch):
    engine = explainer.models["svm"].engine
    real = engine.influence_scores

    def broken(*args, **kwargs):
        scores = real(*args, **kwargs)
        scores[0, ::2] = np.nan
        return scores

    monkeypatch.setattr(engine, "influence_scores", broken)
    with pytest.raises(SolverDivergedError, match="RBF SVM on pixels: 16 influence scores"):
        explainer.explain(test_index=0)


def _poison_with_nan(path):
    """Rewrite an artifact with a NaN in it and a valid checksum (a buggy writer, not damage)."""
    key = _key_of(path)
    arrays = dict(store_module.decode_artifact(path.read_bytes(), key).arrays)
    arrays["features"] = arrays["features"].copy()
    arrays["features"][0, 0] = np.nan
    path.write_bytes(store_module.encode_artifact(key, arrays))


def test_explainer_rebuilds_from_a_damaged_feature_cache(tiny, store, explainer, tmp_path):
    damaged = ArtifactStore(tmp_path / "damaged")
    shutil.copytree(store.root, damaged.root)
    features = sorted(damaged.root.glob("features-*.artifact"))
    assert len(features) == 4  # train and test of both classes
    damages = [DAMAGE["truncated"], DAMAGE["flip-payload-middle"], _poison_with_nan, Path.unlink]
    for path, damage in zip(features, damages, strict=True):
        damage(path)

    from core.features import EfficientNetLite0Featurizer

    calls = []
    real = EfficientNetLite0Featurizer.transform

    def counting(self, images, **kwargs):
        calls.append(len(images))
        return real(self, images, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EfficientNetLite0Featurizer, "transform", counting)
        rebuilt = Explainer(tiny, store=damaged).prepare()
    assert len(calls) == 4  # every damaged chunk recomputed, none trusted
    for key in ("svm", "logreg"):
        np.testing.assert_allclose(
            rebuilt.explain(test_index=1).models[key].scores,
            explainer.explain(test_index=1).models[key].scores,
            rtol=1e-6,
            atol=1e-12,
        )
    # The cache is whole again: a third build reads everything.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EfficientNetLite0Featurizer, "transform", counting)
        Explainer(tiny, store=damaged).prepare()
    assert len(calls) == 4


def _build_in_another_process(root: str, barrier, results) -> None:
    built_from = []
    from core.features import EfficientNetLite0Featurizer

    real = EfficientNetLite0Featurizer.transform

    def counting(self, images, **kwargs):
        built_from.append(len(images))
        return real(self, images, **kwargs)

    EfficientNetLite0Featurizer.transform = counting
    barrier.wait()
    built = Explainer(_tiny_demo(), store=ArtifactStore(root)).prepare()
    scores = built.explain(test_index=1).models["logreg"].scores
    results.put((len(built_from), scores.tolist()))


@pytest.mark.slow
def test_two_processes_preparing_one_cache_at_once(tmp_path, explainer):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    root = tmp_path / "shared"
    workers = [
        context.Process(target=_build_in_another_process, args=(str(root), barrier, results))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    outputs = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    # Each feature chunk was computed by one of them (the lock), and both got the same answer.
    assert sorted(count for count, _ in outputs) in ([0, 4], [1, 3], [2, 2])
    # Both read the same stored features, so their fits and scores agree to float64 rounding.
    np.testing.assert_allclose(outputs[0][1], outputs[1][1], rtol=1e-9, atol=1e-14)
    # This process's explainer featurised the images itself; float32 convolutions in another
    # process need not round alike (seen in a full run under load: 6e-5 relative in the scores),
    # so against it the scores agree to what float32 features allow.
    expected = explainer.explain(test_index=1).models["logreg"].scores
    for _, scores in outputs:
        np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-6)
    assert not list(root.glob("*.tmp")) and not list(root.glob(".*.tmp"))
    shared = ArtifactStore(root)
    for path in root.glob("*.artifact"):
        assert shared.load_artifact(_key_of(path)) is not None, f"{path.name} is damaged"


def _key_of(path):
    data = path.read_bytes()
    _, _, meta_length, _, _ = store_module._PREFIX.unpack_from(data)
    start = store_module._PREFIX.size
    stored = json.loads(data[start : start + meta_length])["key"]
    return CacheKey.of(stored["kind"], stored["fields"])


# ---------------------------------------------------------------- any number of classes


@pytest.fixture(scope="module")
def three_classes(tiny, store):
    return Explainer(tiny, ExplainerConfig(classes="all"), store=store).prepare()


def _photo_like_upload(image: np.ndarray) -> bytes:
    """A dark garment on a light background, 4x larger, as an RGB PNG (a phone photo's layout)."""
    import io

    from PIL import Image

    light = 255 - np.repeat(image, 3, axis=2)
    buffer = io.BytesIO()
    Image.fromarray(light).resize((112, 112)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_three_classes_explain_an_uploaded_photo(tiny, three_classes):
    from core.images import decode_upload

    explainer = three_classes
    assert explainer.class_names == tiny.class_names and explainer.n_train == 48
    summaries = explainer.summaries()
    for summary in summaries.values():
        assert summary.gradient_norm <= 1e-8 and 0.0 <= summary.test_accuracy <= 1.0
    assert explainer.models["svm"].model.n_outputs_ == 3
    assert explainer.models["logreg"].model.n_outputs_ == 3
    decoded = decode_upload(
        _photo_like_upload(tiny.test_images[5]), target_shape=(28, 28, 1), light_on_dark=True
    )
    explanation = explainer.explain(image=decoded.image, k=4)
    assert explanation.true_label is None
    for key, model in explanation.models.items():
        fitted = explainer.models[key]
        inputs = fitted.inputs(decoded.image[None])
        assert model.probabilities.shape == (3,)
        np.testing.assert_allclose(model.probabilities.sum(), 1.0)
        assert model.predicted == int(np.argmax(model.probabilities))
        assert model.explained_label == model.predicted  # an upload explains the prediction
        assert model.predicted_name in tiny.class_names
        expected = fitted.engine.influence_scores(inputs, [model.predicted])[0]
        np.testing.assert_allclose(model.scores, expected)
        assert model.scores.shape == (48,) and np.isfinite(model.scores).all()
        assert 0 < len(model.helpful) <= 4 and 0 < len(model.harmful) <= 4
        assert model.loss == pytest.approx(
            float(fitted.model.loss(inputs, [model.predicted])[0]), rel=1e-12
        )
    # The three-class SVM's scores are checked against retraining like the binary ones.
    checked = explainer.verify(image=decoded.image, k=8)
    for verification in checked.values():
        assert verification.converged
        assert verification.agreement["corrected"].spearman > 0.9


def test_classes_all_is_every_class_in_order(tiny, store):
    for spelled in ("all", ("all",), ["all"]):
        config = ExplainerConfig(classes=spelled)
        assert config.classes == ("all",)
        assert Explainer(tiny, config, store=store).class_names == tiny.class_names
    pair = Explainer(tiny, ExplainerConfig(classes=("Shirt", 0)), store=store)
    assert pair.class_names == ("Shirt", "T-shirt/top")


def test_preparation_can_be_cancelled_and_resumes_from_the_cache(tiny, store, explainer):
    from core.errors import PreparationCancelled

    stages = []

    def cancel() -> bool:
        return len(stages) > 0 and "Fitting the RBF SVM" in stages[-1]

    fresh = Explainer(tiny, store=store)
    with pytest.raises(PreparationCancelled, match="cancelled during"):
        fresh.prepare(lambda stage, done, total: stages.append(stage), cancel=cancel)
    assert not fresh.prepared
    resumed = Explainer(tiny, store=store).prepare()
    np.testing.assert_allclose(
        resumed.models["svm"].model.theta_, explainer.models["svm"].model.theta_, atol=1e-10
    )


def test_cost_lists_every_stage_before_preparing(tiny, store, three_classes):
    cost = Explainer(tiny, ExplainerConfig(classes="all"), store=store).cost()
    assert cost.n_train == 48 and cost.n_classes == 3 and cost.svm == "exact"
    assert cost.uncached_images == 0  # the fixture above computed them
    names = [stage.stage for stage in cost.stages]
    assert any("λ" in name for name in names) and any("Newton-corrected" in name for name in names)
    assert cost.flops > 0 and cost.peak_memory_bytes > 0 and cost.seconds(10.0) > 0
    other = Explainer(load_demo(), ExplainerConfig(classes="all"), store=store).cost()
    assert other.n_train == 5000 and other.svm.startswith("Nyström")
    assert other.uncached_images == 6000


@pytest.fixture
def featurised(monkeypatch) -> list[int]:
    """The size of every batch of images put through the backbone from now on, in order."""
    from core.features import EfficientNetLite0Featurizer

    seen: list[int] = []
    original = EfficientNetLite0Featurizer.transform

    def counting(self, images, *args, **kwargs):
        seen.append(len(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(EfficientNetLite0Featurizer, "transform", counting)
    return seen


def test_a_per_class_cap_limits_what_is_featurised(tiny, tmp_path, featurised):
    """max_train_per_class bounds the backbone's work (not only the fit), and a class keeps the
    same images, hence the same cached features, whichever class it is paired with."""
    seen = featurised
    store = ArtifactStore(tmp_path)
    capped = ExplainerConfig(classes=(0, 2), max_train_per_class=5)
    first = Explainer(tiny, capped, store=store).prepare()
    assert first.n_train == 10
    # Training chunks hold 5 images per class (never the class's 16); test chunks are whole.
    assert sorted(seen) == [4, 4, 5, 5]
    assert max(seen) <= 5
    seen.clear()
    other = Explainer(tiny, ExplainerConfig(classes=(1, 2), max_train_per_class=5), store=store)
    other.prepare()
    # Shirt (class 2) is cached from the first pairing; only Pullover's chunks are computed.
    assert sorted(seen) == [4, 5]
    shirt = tiny.class_names.index("Shirt")
    ids_first = first.dataset.train_ids[first.train_labels == first.class_indices.index(shirt)]
    ids_other = other.dataset.train_ids[other.train_labels == other.class_indices.index(shirt)]
    assert list(ids_first) == list(ids_other)


def test_an_svm_only_explainer_computes_no_backbone_feature(tiny, tmp_path, featurised):
    """models=("svm",) (the dashboard's first look) never runs the backbone, and its SVM is the
    full explainer's: the full preparation afterwards reads the same fitted parameters."""
    calls = featurised
    store = ArtifactStore(tmp_path)
    first = Explainer(tiny, ExplainerConfig(models=("svm",)), store=store)
    assert first.model_keys == ("svm",)
    cost = first.cost()
    assert cost.uncached_images == 0 and not any("features" in s.stage for s in cost.stages)
    assert not any("ogistic" in s.stage for s in cost.stages)
    assert [shape.label for shape in first.model_shapes()] == ["RBF SVM on pixels"]
    first.prepare()
    assert calls == [] and list(first.models) == ["svm"]
    assert not list(Path(tmp_path).glob("features-*"))
    full = Explainer(tiny, store=store).prepare()
    assert calls and list(full.models) == ["svm", "logreg"]
    np.testing.assert_allclose(
        full.models["svm"].model.theta_.numpy(), first.models["svm"].model.theta_.numpy(), atol=1e-9
    )
    alone = first.explain(test_index=3, k=5).models["svm"]
    together = full.explain(test_index=3, k=5).models["svm"]
    np.testing.assert_allclose(alone.scores, together.scores, rtol=1e-6, atol=1e-12)
    assert [i.train_index for i in alone.helpful] == [i.train_index for i in together.helpful]
    # What a front end shows first: the SVM alone, unless that is all there is.
    assert first_look_config(ExplainerConfig()) == ExplainerConfig(models=("svm",))
    assert first_look_config(ExplainerConfig(models=("svm",))) is None
    assert first_look_config(ExplainerConfig(models=("logreg",))) is None
    # Any order names the same models, shown in display order; nothing else is accepted.
    assert ExplainerConfig(models=("logreg", "svm")).models == ("svm", "logreg")
    assert ExplainerConfig(models="logreg").models == ("logreg",)
    for bad in ((), ("svm", "resnet"), ("network",)):
        with pytest.raises(InfluenceExplorerError, match="models must name"):
            ExplainerConfig(models=bad)


def test_a_second_build_reads_the_newton_corrected_forms_from_the_cache(
    tiny, store, explainer, monkeypatch
):
    from core.influence import ExactSolver

    def no_forms(*args, **kwargs):
        raise AssertionError("Q_j were formed again instead of read from the cache")

    monkeypatch.setattr(ExactSolver, "unit_quadratic_forms", no_forms)
    # Each engine given cached forms is offered the class basis's inverse they would have formed.
    offered = []
    keep = ExactSolver.keep_inverse
    monkeypatch.setattr(
        ExactSolver, "keep_inverse", lambda solver: offered.append(solver) or keep(solver)
    )
    again = Explainer(tiny, store=store).prepare()
    assert offered == [fitted.engine.solver for fitted in again.models.values()]
    for key, fitted in explainer.models.items():
        for estimate in fitted.engine.estimates:
            np.testing.assert_array_equal(
                again.models[key].engine.self_influence(estimate),
                fitted.engine.self_influence(estimate),
            )
    first = explainer.explain(test_index=1)
    second = again.explain(test_index=1)
    for key in explainer.models:
        np.testing.assert_array_equal(second.models[key].scores, first.models[key].scores)


def test_forms_of_another_shape_or_with_nan_are_not_used(explainer):
    engine = explainer.models["logreg"].engine
    forms = engine.quadratic_forms
    assert forms is not None and forms.shape[0] == engine.n_train
    assert not engine.provide_quadratic_forms(forms[:-1])
    broken = forms.clone()
    broken[0, 0, 0] = float("nan")
    assert not engine.provide_quadratic_forms(broken)
    assert engine._known_forms is None
