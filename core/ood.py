"""Is an image like the training data? A check in each model's own feature space.

Influence explains a prediction through the training data; for an image unlike any of it (a cat
photo given to a clothes classifier, random noise) the prediction and its "most helpful" images
are both arbitrary, however confident they look. This module measures, for one model, how far an
image lies from the training data **in the space the model works in** (the features its linear
part sees: the kernel features for the SVM, the backbone's features for the logistic regression)
and compares it with the same measurement on held-out test images, which are in distribution by
construction:

    statistic(x) = distance from φ(x) to its k-th nearest training image's φ,

and the image is flagged when its statistic exceeds every held-out test image's. The percentile
among the test images and the ratio to the largest are reported so the user sees how far. The k-th
neighbour (k = 10 by default) rather than the nearest keeps one odd training image from making a
region look familiar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.errors import InfluenceExplorerError
from core.models import as_float64

#: Neighbour rank of the statistic.
DEFAULT_NEIGHBOUR = 10
#: Held-out images the reference distribution uses at most (a seeded sample beyond that).
MAX_REFERENCE = 2000

#: Largest relative error :meth:`NeighbourDistance.query` allows in a distance computed from
#: the expansion ‖a‖² + ‖b‖² - 2aᵀb; rows where cancellation could exceed it are recomputed as
#: ‖a - b‖ directly.
DISTANCE_RTOL = 1e-8


@dataclass(frozen=True)
class Familiarity:
    """Where one image lies among the training data in one model's feature space.

    Attributes:
        statistic: distance to the k-th nearest training image, in the model's feature units.
        percentile: share (0-100) of held-out test images whose statistic is smaller or equal.
        threshold: the largest statistic among the held-out test images.
        ratio: ``statistic / threshold``; above 1 means farther than every held-out test image.
        unusual: ``ratio > 1``.
        k: the neighbour rank used.
    """

    statistic: float
    percentile: float
    threshold: float
    ratio: float
    unusual: bool
    k: int

    def message(self, model_label: str) -> str:
        """A sentence for the page and the JSON: what was measured and how far off it is."""
        if not self.unusual:
            return (
                f"{model_label}: within the training data's range (distance to its {_nth(self.k)} "
                f"nearest training image at the {self.percentile:.0f}th percentile of held-out "
                "test images)."
            )
        return (
            f"{model_label}: this image is unlike the training data — in this model's feature "
            f"space its distance to the {_nth(self.k)} nearest training image is "
            f"{self.ratio:.2f}× the largest among held-out test images. The prediction and the "
            "helpful and harmful images describe how the model extrapolates, not what it learnt "
            "from similar images."
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "statistic": self.statistic,
            "percentile": self.percentile,
            "threshold": self.threshold,
            "ratio": self.ratio,
            "unusual": self.unusual,
            "k": self.k,
        }


@dataclass(frozen=True)
class Neighbourhood:
    """One point among the training data in a model's feature space.

    Attributes:
        distances: (n,) Euclidean distance from its features to every training point's.
        familiarity: its :class:`Familiarity`.
    """

    distances: np.ndarray
    familiarity: Familiarity


def _nth(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


class NeighbourDistance:
    """The k-th-nearest-neighbour distance to a set of training features, with a reference
    distribution from held-out features.

    Args:
        train_features: (n, d) the model's training features.
        reference_features: (m, d) features of held-out images of the same distribution (the
            test split); at most ``max_reference`` of them are used (a seeded sample).
        k: neighbour rank (capped at n).
        chunk: query rows per distance block (bounds memory at chunk x n).
    """

    def __init__(
        self,
        train_features: Any,
        reference_features: Any,
        *,
        k: int = DEFAULT_NEIGHBOUR,
        max_reference: int = MAX_REFERENCE,
        seed: int = 0,
        chunk: int = 512,
    ) -> None:
        self.train = as_float64(train_features)
        if self.train.ndim != 2 or self.train.shape[0] < 1:
            raise InfluenceExplorerError("train_features must be (n, d) with n >= 1.")
        self.k = max(1, min(int(k), self.train.shape[0]))
        self.chunk = int(chunk)
        self._train_sq = (self.train * self.train).sum(1)
        reference = as_float64(reference_features)
        if reference.ndim != 2 or reference.shape[1] != self.train.shape[1]:
            raise InfluenceExplorerError(
                f"reference_features must be (m, {self.train.shape[1]}); got "
                f"{tuple(reference.shape)}."
            )
        if reference.shape[0] == 0:
            raise InfluenceExplorerError("At least one held-out image is needed as a reference.")
        if reference.shape[0] > max_reference:
            rows = np.random.default_rng(seed).choice(reference.shape[0], max_reference, False)
            reference = reference[torch.as_tensor(np.sort(rows))]
        self.reference = np.sort(self.statistics(reference))

    def _squared_distances(self, block: torch.Tensor) -> torch.Tensor:
        """‖φ_j - x‖² for each row x of ``block`` (b, d) and every training φ_j, by the expansion
        ‖x‖² + ‖φ_j‖² - 2 xᵀφ_j (one product with the training features), clamped at 0.
        Returns: (b, n)."""
        squared = (
            (block * block).sum(1)[:, None] + self._train_sq[None, :] - 2.0 * block @ self.train.T
        )
        return squared.clamp_min(0.0)

    def statistics(self, features: Any) -> np.ndarray:
        """Distance to the k-th nearest training feature vector. Returns: (q,)."""
        queries = as_float64(features)
        out = np.empty(queries.shape[0])
        for start in range(0, queries.shape[0], self.chunk):
            block = queries[start : start + self.chunk]
            kth = torch.kthvalue(self._squared_distances(block), self.k, dim=1).values
            out[start : start + len(block)] = kth.sqrt().numpy()
        return out

    def query(self, features: Any) -> Neighbourhood:
        """One point's distance to every training point's features, and its :class:`Familiarity`,
        from one pass over the training features (what an explanation shows for an image).

        The familiarity is :meth:`check`'s, from the same squared distances. The distances come
        from the expansion too, whose rounding error is at most about (d + 2)·ε·(‖φ_j‖² + ‖x‖²)
        (the dot product's bound); on rows where that could exceed :data:`DISTANCE_RTOL` of the
        squared distance (near-duplicates of the point) they are recomputed as ‖φ_j - x‖, so
        every distance is within DISTANCE_RTOL / 2 (relative) of the direct formula's.

        Args:
            features: (1, d) or (d,).
        """
        point = as_float64(features).reshape(1, -1)
        squared = self._squared_distances(point)[0]
        kth = float(torch.kthvalue(squared, self.k).values.sqrt())
        d = point.shape[1]
        bound = (d + 2) * torch.finfo(squared.dtype).eps * (self._train_sq + (point * point).sum())
        close = torch.nonzero(squared <= bound / DISTANCE_RTOL).flatten()
        if len(close):
            squared = squared.clone()
            squared[close] = (self.train[close] - point).square().sum(1)
        return Neighbourhood(squared.sqrt().numpy(), self._familiarity(kth))

    def check(self, features: Any) -> list[Familiarity]:
        """:class:`Familiarity` of each row of ``features`` (q, d)."""
        return [self._familiarity(float(value)) for value in self.statistics(features)]

    def _familiarity(self, value: float) -> Familiarity:
        threshold = float(self.reference[-1])
        percentile = 100.0 * np.searchsorted(self.reference, value, side="right")
        percentile /= len(self.reference)
        ratio = value / threshold if threshold > 0 else float("inf")
        return Familiarity(
            statistic=value,
            percentile=float(percentile),
            threshold=threshold,
            ratio=ratio,
            unusual=bool(value > threshold),
            k=self.k,
        )


__all__ = [
    "DEFAULT_NEIGHBOUR",
    "DISTANCE_RTOL",
    "Familiarity",
    "NeighbourDistance",
    "Neighbourhood",
]
