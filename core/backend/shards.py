"""Training rows in shards: features and labels held in the workers' memory, computed there.

A :class:`Shard` is a contiguous block of training rows: features (n_s, d), float32 as the
backbones produce them (float64 for derived features such as the Nyström map), and labels. A
:class:`ShardedData` is the ordered list of them as runner handles (Dask futures on a cluster), with
their sizes; global row j is row j - offset of the shard that holds it.

Shards are made by tasks, never scattered from the driver, so that Dask can recompute a shard
whose worker was lost: from the artifact store (:meth:`ShardedData.from_store`, and
:func:`extract_features`, whose workers compute features over image shards and write them to the
store), from a seeded generator (:meth:`ShardedData.from_generator`, the benchmark's synthetic
features), or from arrays the driver already holds (:meth:`ShardedData.from_arrays`, which
writes them to the store first when given one).

The store must be a directory every worker can read and write (the same path on a shared file
system for a multi-machine cluster).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.backend.runner import LocalRunner, Runner
from core.errors import InfluenceExplorerError
from core.store import ArtifactStore, CacheKey

#: Rows per shard when the caller does not choose.
DEFAULT_SHARD_ROWS = 65_536


@dataclass(frozen=True)
class Shard:
    """A contiguous block of training rows.

    Attributes:
        offset: global index of the first row.
        features: (n_s, d) float32 (or float64) features, C-contiguous.
        labels: (n_s,) int64 class indices.
    """

    offset: int
    features: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or self.labels.shape != (self.features.shape[0],):
            raise InfluenceExplorerError(
                f"A shard needs (n, d) features and (n,) labels; got {self.features.shape} and "
                f"{self.labels.shape}."
            )
        if self.features.dtype not in (np.float32, np.float64):
            raise InfluenceExplorerError(
                f"Shard features must be float32 or float64; got {self.features.dtype}."
            )

    @property
    def size(self) -> int:
        return int(self.features.shape[0])


def make_shard(offset: int, features: Any, labels: Any) -> Shard:
    """A :class:`Shard` from array-likes (features keep float32/float64, labels become int64)."""
    features = np.asarray(features)
    if features.dtype not in (np.float32, np.float64):
        features = features.astype(np.float64)
    return Shard(
        int(offset),
        np.ascontiguousarray(features),
        np.ascontiguousarray(np.asarray(labels), dtype=np.int64),
    )


def split_rows(n: int, n_shards: int) -> list[tuple[int, int]]:
    """[start, stop) of ``n_shards`` near-equal contiguous blocks of n rows."""
    n_shards = max(1, min(int(n_shards), n))
    bounds = np.linspace(0, n, n_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def default_n_shards(n: int, n_workers: int, shard_rows: int = DEFAULT_SHARD_ROWS) -> int:
    """Enough shards that each holds at most ``shard_rows`` rows and every worker gets two."""
    return max(1, min(n, max(2 * n_workers, math.ceil(n / shard_rows))))


# ------------------------------------------------------------------ tasks (run on workers)
def _shard_summary(shard: Shard) -> tuple[int, int, int, int, str, int]:
    labels = shard.labels
    low = int(labels.min()) if labels.size else 0
    high = int(labels.max()) if labels.size else 0
    nonfinite = int((~np.isfinite(shard.features).all(axis=1)).sum())
    return shard.size, int(shard.features.shape[1]), low, high, shard.features.dtype.str, nonfinite


def _store_shard(
    store: ArtifactStore, key: CacheKey, offset: int, features: Any, labels: Any
) -> Shard:
    shard = make_shard(offset, features, labels)
    store.save(key, {"features": shard.features, "labels": shard.labels})
    return shard


def _load_shard(store: ArtifactStore, key: CacheKey, offset: int) -> Shard:
    arrays = store.load(key)
    if arrays is None:
        raise InfluenceExplorerError(
            f"Shard {key.filename} is missing or damaged in the artifact store {store.root}; "
            "the store must be a directory every worker can read (a shared file system). "
            "Recompute the shards."
        )
    return make_shard(offset, arrays["features"], arrays["labels"])


def _generate_shard(
    generator: Callable[..., tuple[Any, Any]], index: int, offset: int, rows: int, *args: Any
) -> Shard:
    features, labels = generator(index, rows, *args)
    return make_shard(offset, features, labels)


def _embedded_shard(offset: int, features: np.ndarray, labels: np.ndarray) -> Shard:
    return make_shard(offset, features, labels)


def _take_rows(shard: Shard, local: np.ndarray, offset: int) -> Shard:
    return make_shard(offset, shard.features[local], shard.labels[local])


def _rows_of(shard: Shard, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.array(shard.features[local], dtype=np.float64), shard.labels[local].copy()


def _labels_of(shard: Shard) -> np.ndarray:
    return shard.labels


def _features_of(shard: Shard) -> np.ndarray:
    return shard.features


@dataclass
class ShardedData:
    """Training rows in shards held by a runner (on a cluster: futures on the workers).

    Attributes:
        runner: where the shards live.
        shards: one handle per shard, in row order.
        sizes: rows per shard.
        dim: feature dimension d.
        dtype: the features' dtype ("<f4" float32, "<f8" float64).
        label_range: smallest and largest label.
        nonfinite: rows with a NaN or infinite feature (a model refuses to fit them).
    """

    runner: Runner
    shards: list[Any]
    sizes: tuple[int, ...]
    dim: int
    dtype: str
    label_range: tuple[int, int]
    nonfinite: int = 0
    _labels: np.ndarray | None = field(default=None, repr=False)
    _dense: np.ndarray | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_handles(cls, runner: Runner, shards: Sequence[Any]) -> ShardedData:
        """Wrap shard handles, reading their sizes, dimension, label range and non-finite rows."""
        shards = list(shards)
        if not shards:
            raise InfluenceExplorerError("A sharded data set needs at least one shard.")
        summaries = runner.gather(runner.map(_shard_summary, [shards]))
        dims = {s[1] for s in summaries}
        dtypes = {s[4] for s in summaries}
        if len(dims) != 1 or len(dtypes) != 1:
            raise InfluenceExplorerError(
                f"Every shard must have the same feature dimension and dtype; got dimensions "
                f"{sorted(dims)} and dtypes {sorted(dtypes)}."
            )
        nonempty = [s for s in summaries if s[0] > 0]
        if not nonempty:
            raise InfluenceExplorerError("Every shard is empty.")
        return cls(
            runner=runner,
            shards=shards,
            sizes=tuple(s[0] for s in summaries),
            dim=dims.pop(),
            dtype=dtypes.pop(),
            label_range=(min(s[2] for s in nonempty), max(s[3] for s in nonempty)),
            nonfinite=sum(s[5] for s in summaries),
        )

    @classmethod
    def local(cls, shards: Sequence[Shard]) -> ShardedData:
        """Shards already in this process (inside a worker's task, or tests)."""
        return cls.from_handles(LocalRunner(), shards)

    @classmethod
    def from_arrays(
        cls,
        runner: Runner,
        X: Any,
        y: Any,
        *,
        n_shards: int | None = None,
        store: ArtifactStore | None = None,
        name: str = "arrays",
    ) -> ShardedData:
        """Split arrays the driver holds into contiguous shards.

        With a ``store`` each shard is first written there and the workers load it, so a lost
        worker's shards are reloaded; without one the shards travel inside their tasks (fine
        for data that fits the scheduler's memory, e.g. tests).

        Args:
            X: (n, d) features (float32 stays float32; anything else becomes float64).
            y: (n,) labels.
            n_shards: default :func:`default_n_shards`.
            store: optional shared artifact store.
            name: part of the store keys (with a digest of the arrays).
        """
        X = np.asarray(X)
        y = np.asarray(y)
        if X.ndim != 2 or y.shape != (X.shape[0],):
            raise InfluenceExplorerError(
                f"X must be (n, d) and y (n,) with the same n; got {X.shape} and {y.shape}."
            )
        n = X.shape[0]
        n_shards = default_n_shards(n, runner.n_workers) if n_shards is None else int(n_shards)
        if n_shards < 1:
            raise InfluenceExplorerError(f"n_shards must be >= 1; got {n_shards}.")
        handles = []
        for index, (start, stop) in enumerate(split_rows(n, n_shards)):
            features, labels = X[start:stop], y[start:stop]
            if store is None:
                handles.append(
                    runner.submit(_embedded_shard, start, np.array(features), np.array(labels))
                )
                continue
            shard = make_shard(start, features, labels)
            key = shard_key(name, index, shard)
            store.save(key, {"features": shard.features, "labels": shard.labels})
            handles.append(runner.submit(_load_shard, store, key, start))
        return cls.from_handles(runner, handles)

    @classmethod
    def from_generator(
        cls,
        runner: Runner,
        generator: Callable[..., tuple[Any, Any]],
        sizes: Sequence[int],
        *args: Any,
    ) -> ShardedData:
        """Shards made on the workers by ``generator(index, rows, *args) -> (features, labels)``
        (shard ``index`` of ``sizes[index]`` rows).

        The generator must be deterministic (a lost shard is made again) and importable on
        the workers (a module-level function of an installed package).
        """
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
        handles = [
            runner.submit(_generate_shard, generator, i, int(offsets[i]), int(sizes[i]), *args)
            for i in range(len(sizes))
        ]
        data = cls.from_handles(runner, handles)
        if data.sizes != tuple(int(s) for s in sizes):
            raise InfluenceExplorerError(
                f"The generator made shards of {data.sizes} rows, not the {tuple(sizes)} asked for."
            )
        return data

    @classmethod
    def from_store(
        cls, runner: Runner, store: ArtifactStore, keys: Sequence[CacheKey], sizes: Sequence[int]
    ) -> ShardedData:
        """Shards the workers read from the artifact store (written by :func:`extract_features`
        or :meth:`from_arrays`)."""
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
        handles = [
            runner.submit(_load_shard, store, key, int(offset))
            for key, offset in zip(keys, offsets, strict=True)
        ]
        return cls.from_handles(runner, handles)

    # ------------------------------------------------------------------ shape and rows
    @property
    def n(self) -> int:
        return int(sum(self.sizes))

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.dim

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    @property
    def offsets(self) -> np.ndarray:
        """(n_shards,) global index of each shard's first row."""
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    @property
    def nbytes(self) -> int:
        """Bytes of features over all shards."""
        return self.n * self.dim * np.dtype(self.dtype).itemsize

    def locate(self, indices: Any) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Group global row indices by shard.

        Returns:
            (shard position, local rows, positions in ``indices``) for each shard concerned.
        Raises:
            InfluenceExplorerError: an index outside [0, n).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise InfluenceExplorerError(f"Training indices must be in [0, {self.n}).")
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        out = []
        for s in np.unique(shard_of):
            positions = np.flatnonzero(shard_of == s)
            out.append((int(s), idx[positions] - self.offsets[s], positions))
        return out

    def rows(self, indices: Any) -> tuple[np.ndarray, np.ndarray]:
        """Features (float64) and labels of the listed rows, in the order given."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        features = np.empty((idx.size, self.dim))
        labels = np.empty(idx.size, dtype=np.int64)
        located = self.locate(idx)
        handles = [self.runner.submit(_rows_of, self.shards[s], local) for s, local, _ in located]
        for (_, _, positions), (f, y) in zip(located, self.runner.gather(handles), strict=True):
            features[positions] = f
            labels[positions] = y
        return features, labels

    def labels(self) -> np.ndarray:
        """(n,) every label (n integers: small next to the features)."""
        if self._labels is None:
            parts = self.runner.gather(self.runner.map(_labels_of, [self.shards]))
            self._labels = np.concatenate(parts).astype(np.int64)
        return self._labels

    def gather(self) -> np.ndarray:
        """(n, d) every feature on the driver, as float64. Only for data that fits it (small
        problems, the explainer's λ selection); the sharded models never call this."""
        parts = self.runner.gather(self.runner.map(_features_of, [self.shards]))
        return np.concatenate(parts, axis=0).astype(np.float64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: Any) -> np.ndarray:
        """Rows on the driver as float64, numpy-style (a boolean mask or integer indices), so
        in-process code written for arrays (the explainer's λ cross-validation) can read a
        sharded set. The first use gathers every row once (n·d numbers on the driver)."""
        if self._dense is None:
            self._dense = self.gather()
        return self._dense[rows]

    def take(self, indices: Any, *, n_shards: int | None = None) -> ShardedData:
        """A new sharded set of the listed rows (in the order given), made on the workers from
        these shards (e.g. the training folds of a cross-validation)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n_shards = (
            default_n_shards(idx.size, self.runner.n_workers) if n_shards is None else n_shards
        )
        all_labels = self.labels()
        handles = []
        for start, stop in split_rows(idx.size, n_shards):
            block = idx[start:stop]
            located = self.locate(block)
            if len(located) == 1 and np.array_equal(located[0][2], np.arange(block.size)):
                s, local, _ = located[0]
                handles.append(self.runner.submit(_take_rows, self.shards[s], local, start))
                continue
            # Rows from several shards, concatenated shard by shard, then put back in the
            # requested order.
            pieces = [local for _, local, _ in located]
            order = np.concatenate([positions for _, _, positions in located])
            handles.append(
                self.runner.submit(
                    _gather_rows,
                    start,
                    pieces,
                    np.argsort(order),
                    all_labels[block],
                    *[self.shards[s] for s, _, _ in located],
                )
            )
        return ShardedData.from_handles(self.runner, handles)


def _gather_rows(
    offset: int,
    pieces: list[np.ndarray],
    inverse: np.ndarray,
    labels: np.ndarray,
    *sources: Shard,
) -> Shard:
    """Rows ``pieces[i]`` of ``sources[i]``, concatenated, then reordered by ``inverse``."""
    parts = [source.features[rows] for source, rows in zip(sources, pieces, strict=True)]
    return make_shard(offset, np.concatenate(parts, axis=0)[inverse], labels)


def shard_key(name: str, index: int, shard: Shard) -> CacheKey:
    """Store key of a shard written from the driver: its name, position and a content digest."""
    import hashlib

    digest = hashlib.sha256()
    digest.update(shard.features.tobytes())
    digest.update(shard.labels.tobytes())
    return CacheKey.of(
        "shard",
        {
            "name": name,
            "index": int(index),
            "offset": int(shard.offset),
            "rows": shard.size,
            "sha256": digest.hexdigest(),
        },
    )


# ------------------------------------------------------------------ features on the workers
@dataclass(frozen=True)
class ArrayImages:
    """Images that travel inside the task (the driver already holds them).

    Attributes:
        images: (N, H, W, C) uint8.
    """

    images: np.ndarray

    def load(self) -> np.ndarray:
        return self.images


@dataclass(frozen=True)
class ImageFiles:
    """Image files a worker reads and decodes itself (a shared file system), exactly as
    :func:`core.data.load_image_folder` decodes a dataset's files.

    Attributes:
        paths: the files, in row order.
        image_shape: (H, W, C) of the dataset's images.
        light_on_dark: as the dataset's.
    """

    paths: tuple[str, ...]
    image_shape: tuple[int, int, int]
    light_on_dark: bool = False

    def load(self) -> np.ndarray:
        from core.images import load_image_file

        out = np.empty((len(self.paths), *self.image_shape), dtype=np.uint8)
        for i, path in enumerate(self.paths):
            out[i] = load_image_file(
                Path(path), target_shape=self.image_shape, light_on_dark=self.light_on_dark
            ).image
        return out


_FEATURIZERS: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}
_FEATURIZERS_LOCK = threading.Lock()


def _worker_featurizer(name: str, options: tuple[tuple[str, Any], ...]) -> Any:
    """One featurizer per worker process and setting, so weights load once per worker."""
    from core.features import get_featurizer

    with _FEATURIZERS_LOCK:
        key = (name, options)
        if key not in _FEATURIZERS:
            _FEATURIZERS[key] = get_featurizer(name, **dict(options))
        return _FEATURIZERS[key]


def worker_device() -> str:
    """The device a worker computes features on: its GPU when it has one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _feature_shard(
    store: ArtifactStore,
    featurizer_name: str,
    options: tuple[tuple[str, Any], ...],
    source: Any,
    labels: np.ndarray,
    offset: int,
    dataset_hash: str,
    part: str,
    batch_size: int,
) -> Shard:
    from core.features import cached_features

    featurizer = _worker_featurizer(featurizer_name, options)
    features = cached_features(
        store,
        featurizer,
        source.load(),
        dataset_hash=dataset_hash,
        part=part,
        batch_size=batch_size,
        device=worker_device(),
    )
    return make_shard(offset, features, labels)


def extract_features(
    runner: Runner,
    featurizer: str,
    sources: Sequence[Any],
    labels: Sequence[Any],
    *,
    store: ArtifactStore,
    dataset_hash: str,
    part: str,
    featurizer_options: dict[str, Any] | None = None,
    batch_size: int = 64,
) -> ShardedData:
    """Features of image shards, computed by the workers (each on its GPU if it has one, else
    its CPU) and written by them to the artifact store, which the next run reads instead.

    Args:
        runner: where to compute.
        featurizer: a name from :func:`core.features.featurizer_names`.
        sources: one image source per shard (:class:`ArrayImages`, :class:`ImageFiles`, or any
            picklable object with ``load() -> (N, H, W, C) uint8``).
        labels: one (N,) label array per shard.
        store: the artifact store (a directory every worker can reach).
        dataset_hash: the dataset's content hash (part of the cache keys).
        part: names the shards in the store, e.g. ``"train"`` (shard i is ``"train/shard{i}"``).
        featurizer_options: passed to :func:`core.features.get_featurizer` on each worker.
        batch_size: images per forward pass.
    """
    if len(sources) != len(labels):
        raise InfluenceExplorerError("Give one label array per image source.")
    options = tuple(sorted((featurizer_options or {}).items()))
    sizes = [len(np.asarray(y)) for y in labels]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    with runner.stage(f"Computing {featurizer} features"):
        handles = [
            runner.submit(
                _feature_shard,
                store,
                featurizer,
                options,
                source,
                np.asarray(y, dtype=np.int64),
                int(offset),
                dataset_hash,
                f"{part}/shard{i}",
                batch_size,
            )
            for i, (source, y, offset) in enumerate(zip(sources, labels, offsets, strict=True))
        ]
        return ShardedData.from_handles(runner, handles)


__all__ = [
    "DEFAULT_SHARD_ROWS",
    "ArrayImages",
    "ImageFiles",
    "Shard",
    "ShardedData",
    "default_n_shards",
    "extract_features",
    "make_shard",
    "shard_key",
    "split_rows",
    "worker_device",
]
