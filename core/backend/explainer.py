"""What :class:`core.explainer.Explainer` does differently on a cluster, in one place.

With ``Explainer(..., cluster=...)`` the logistic regression on backbone features runs on the
cluster: the workers compute the training features per class (GPU if they have one) through
the same artifact-store entries as in-process (:func:`core.features.cached_features`, so a
cache filled by either is used by both and the features are the same bits), the rows are
reassembled into shards in the explainer's order, λ is chosen by the rule of
:mod:`core.selection` with every fold fitted on the shards (:mod:`core.backend.selection`), and
the model and its engine are :class:`~core.backend.models.ShardedLogisticRegression` (softmax
for C classes) and :class:`~core.backend.engine.ShardedInfluenceEngine` (all three estimates,
the exact-in-the-margin default included). The RBF SVM on pixels stays in-process,
built as everywhere by :func:`core.models.make_rbf_svm`: the exact kernel SVM while its n x n
kernel and the engine's matrices fit the memory budget, beyond it the Nyström SVM (whose memory
grows with n·m, not n²), so a cluster run refuses nothing for the SVM's size.

The helpers below take either kind of model, so the explainer calls them without asking which.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from core import selection
from core.backend import kernels
from core.backend import selection as sharded_selection
from core.backend.engine import ShardedInfluenceEngine
from core.backend.models import ShardedLinearModel, ShardedLogisticRegression
from core.backend.shards import ShardedData, default_n_shards, make_shard
from core.errors import InfluenceExplorerError
from core.influence import InfluenceEngine, SolverConfig
from core.models import LinearModel, LogisticRegression, as_float64
from core.ood import DEFAULT_NEIGHBOUR, MAX_REFERENCE, NeighbourDistance, Neighbourhood
from core.selection import SelectionConfig
from core.store import ArtifactStore
from core.validation import verify


def _class_features(
    store: ArtifactStore,
    featurizer_name: str,
    options: tuple[tuple[str, Any], ...],
    images: np.ndarray,
    dataset_hash: str,
    part: str,
    label: int,
) -> Any:
    """One class's features, on a worker, through the same cache entry as in-process."""
    from core.backend.shards import _worker_featurizer, worker_device
    from core.features import cached_features

    featurizer = _worker_featurizer(featurizer_name, options)
    features = cached_features(
        store, featurizer, images, dataset_hash=dataset_hash, part=part, device=worker_device()
    )
    return make_shard(0, features, np.full(len(features), label, dtype=np.int64))


def train_features(explainer: Any, cluster: Any) -> ShardedData:
    """The explainer's training features as shards on the cluster, in the explainer's row order
    (as :meth:`core.explainer.Explainer._backbone_features` assembles them in-process), each class
    featurised under the same cache part as in-process: only its images in use."""
    runner = cluster.runner
    dataset, source = explainer.dataset, explainer.source
    backbone = explainer.backbone
    options = tuple(sorted(explainer._backbone_options().items()))
    handles, order = [], np.empty(dataset.n_train, dtype=np.int64)
    offset = 0
    stage = f"{backbone.label} features on the cluster"
    explainer._progress(stage, 0, 1)
    with runner.stage(stage):
        for new_label, (mine, rows, part) in enumerate(explainer._feature_parts("train")):
            handles.append(
                runner.submit(
                    _class_features,
                    explainer.store,
                    backbone.name,
                    options,
                    np.ascontiguousarray(source.train_images[rows]),
                    source.content_hash,
                    part,
                    new_label,
                )
            )
            # The part's k-th image is this explainer's training row mine[k].
            order[mine] = offset + np.arange(len(mine))
            offset += len(mine)
        chunks = ShardedData.from_handles(runner, handles)
        shards = chunks.take(order, n_shards=default_n_shards(len(order), runner.n_workers))
    explainer._progress(stage, 1, 1)
    return shards


def held_out_values(
    features: Any, labels: np.ndarray, config: SelectionConfig, progress: Any = None
) -> dict[str, np.ndarray]:
    """λ cross-validation's per-example held-out values (:mod:`core.selection`): fitted on the
    shards for shards (:func:`core.backend.selection.held_out_values`), else in-process."""
    if isinstance(features, ShardedData):
        return sharded_selection.held_out_values(features, labels, config, progress=progress)
    return selection.held_out_values(features, labels, config, progress=progress)


def logistic_regression(l2: float, features: Any) -> LinearModel:
    """The explainer's logistic regression for these features: sharded for shards."""
    if isinstance(features, ShardedData):
        return ShardedLogisticRegression(l2=l2)
    return LogisticRegression(l2=l2)


def make_engine(model: LinearModel, solver: SolverConfig) -> InfluenceEngine:
    """The influence engine for a model: the sharded one for a sharded model."""
    if isinstance(model, ShardedLinearModel):
        return ShardedInfluenceEngine(model, solver)
    return InfluenceEngine(model, solver)


def training_accuracy(model: LinearModel, labels: np.ndarray) -> float:
    """Training accuracy (a pass over the shards for a sharded model)."""
    if isinstance(model, ShardedLinearModel):
        return model.training_accuracy()
    return float(np.mean(model.predict(model.training_inputs_) == labels))


def feature_distances(model: LinearModel, features: torch.Tensor) -> np.ndarray:
    """Distance from one point's features (1, d) to every training point's. (n,)."""
    if isinstance(model, ShardedLinearModel):
        return model.training_feature_distances(features)
    return torch.linalg.norm(model.features_ - features, dim=1).numpy()


class ShardedNeighbourDistance(NeighbourDistance):
    """:class:`core.ood.NeighbourDistance` over a sharded model's training features: each
    shard's k smallest squared distances, merged, so the k-th nearest is the same number as
    in-process. Same arguments, with the feature shards in place of the (n, d) features."""

    def __init__(
        self,
        data: ShardedData,
        reference_features: Any,
        *,
        k: int = DEFAULT_NEIGHBOUR,
        max_reference: int = MAX_REFERENCE,
        seed: int = 0,
        chunk: int = 512,
    ) -> None:
        self.data = data
        self.k = max(1, min(int(k), data.n))
        self.chunk = int(chunk)
        reference = as_float64(reference_features)
        if reference.ndim != 2 or reference.shape[1] != data.dim or reference.shape[0] == 0:
            raise InfluenceExplorerError(
                f"reference_features must be (m, {data.dim}) with m >= 1; got "
                f"{tuple(reference.shape)}."
            )
        # The same seeded sample of the held-out images as in-process.
        if reference.shape[0] > max_reference:
            rows = np.random.default_rng(seed).choice(reference.shape[0], max_reference, False)
            reference = reference[torch.as_tensor(np.sort(rows))]
        self.reference = np.sort(self.statistics(reference))

    def statistics(self, features: Any) -> np.ndarray:
        queries = as_float64(features).numpy()
        runner = self.data.runner
        with runner.stage("Distances to the training data"):
            parts = runner.gather(
                runner.map(kernels.nearest_squared, [self.data.shards], queries, self.k, self.chunk)
            )
        merged = np.concatenate(parts, axis=1)
        return np.sqrt(np.partition(merged, self.k - 1, axis=1)[:, self.k - 1])

    def query(self, features: Any) -> Neighbourhood:
        """:meth:`core.ood.NeighbourDistance.query` over the shards, in one pass as there: each
        shard's distances (as ``ShardedLinearModel.training_feature_distances``) and its k
        smallest squared distances (as :meth:`statistics`), merged into the familiarity."""
        point = as_float64(features).reshape(-1).numpy()
        runner = self.data.runner
        with runner.stage("Feature distances and familiarity"):
            parts = runner.gather(
                runner.map(kernels.neighbourhood_part, [self.data.shards], point, self.k)
            )
        nearest = np.concatenate([smallest for _, smallest in parts])
        kth = float(np.sqrt(np.partition(nearest, self.k - 1)[self.k - 1]))
        return Neighbourhood(np.concatenate([d for d, _ in parts]), self._familiarity(kth))


def neighbour_distance(model: LinearModel, reference_features: Any, *, seed: int) -> Any:
    """The out-of-distribution check's k-th-neighbour distance for a model (sharded or not)."""
    if isinstance(model, ShardedLinearModel):
        return ShardedNeighbourDistance(model.data_, reference_features, seed=seed)
    return NeighbourDistance(model.features_, reference_features, seed=seed)


def verifier(engine: InfluenceEngine) -> Callable[..., Any]:
    """``verify(engine, X, y, k=..., select_by=..., progress=...)`` for either kind of engine
    (the sharded one retrains in independent tasks)."""
    if isinstance(engine, ShardedInfluenceEngine):
        return lambda _engine, X, y, **kwargs: engine.verify(X, y, **kwargs)
    return verify


__all__ = [
    "ShardedNeighbourDistance",
    "feature_distances",
    "held_out_values",
    "logistic_regression",
    "make_engine",
    "neighbour_distance",
    "train_features",
    "training_accuracy",
    "verifier",
]
