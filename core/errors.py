"""Domain errors. Each subclasses ``ValueError`` and its message says what was wrong and what to do."""

from __future__ import annotations


class InfluenceExplorerError(ValueError):
    """Base class of every error the engine raises on purpose."""


class NotFittedError(InfluenceExplorerError):
    """A model or engine was used before ``fit``."""


class DatasetError(InfluenceExplorerError):
    """A dataset could not be found, read or understood."""


class ImageDecodeError(InfluenceExplorerError):
    """An uploaded or on-disk image could not be decoded into the dataset's format."""


class BackboneUnavailableError(InfluenceExplorerError):
    """A feature backbone's weights cannot be had on this machine."""


class CacheError(InfluenceExplorerError):
    """A cached artifact is damaged or of another format version (it is rebuilt, never trusted)."""


class NotPositiveDefiniteError(InfluenceExplorerError):
    """The Hessian (plus damping) is not positive definite, so it cannot be inverted as asked."""


class ConvergenceError(InfluenceExplorerError):
    """An iterative solver or a training run did not reach its tolerance."""


class SolverDivergedError(InfluenceExplorerError):
    """An iterative inverse-Hessian estimate (LiSSA) blew up instead of converging."""
