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
    """The Hessian (plus damping) is not positive definite, so it cannot be inverted as asked.

    Attributes:
        suggested_damping: the smallest damping known to make it positive definite, when the
            solver could measure it (the exact solver does); ``None`` otherwise. Front ends use
            it to point at a concrete setting instead of repeating the message.
    """

    def __init__(self, message: str, *, suggested_damping: float | None = None) -> None:
        super().__init__(message)
        self.suggested_damping = suggested_damping


class ConvergenceError(InfluenceExplorerError):
    """An iterative solver or a training run did not reach its tolerance."""


class SolverDivergedError(InfluenceExplorerError):
    """An iterative inverse-Hessian estimate (LiSSA) blew up instead of converging."""


class NonFiniteFeaturesError(InfluenceExplorerError):
    """A featurizer produced NaN or infinite values, so no model can use them."""


class ClusterError(InfluenceExplorerError):
    """A Dask cluster could not be reached or used: a bad ``INFLUENCE_CLUSTER``/``--cluster``
    setting, an unreachable scheduler, mismatched package versions on the workers, or a worker
    lost mid-job that Dask could not recover from (the message names the stage)."""


class NetworkError(InfluenceExplorerError):
    """A user's network could not be used: unknown architecture, weights that do not fit it, a
    file that is not a state dict or a safe ``torch.export`` program, no final linear layer."""


class UploadError(InfluenceExplorerError):
    """An uploaded archive or weights file was refused (too large, unsafe, wrong layout)."""


class PreparationCancelled(InfluenceExplorerError):
    """Preparing an explainer was stopped on request (its ``cancel`` callback returned True)."""


class UnreadableFileError(InfluenceExplorerError):
    """A file on disk was refused before decoding: missing, not a regular file (a FIFO, device or
    socket), outside the allowed directories, or larger than the limit."""


class OutsideRootsError(DatasetError):
    """A dataset path, or a symbolic link inside a dataset, leads outside the allowed directories."""


class MemoryBudgetError(InfluenceExplorerError):
    """Work was refused before it started because it would not fit in the process's memory
    budget (``core.budget``).

    Attributes:
        needed: the work's estimated need in bytes, when known.
        free: the bytes the budget had free then, when known.
    """

    def __init__(self, message: str, *, needed: int | None = None, free: int | None = None) -> None:
        super().__init__(message)
        self.needed = needed
        self.free = free


class ServerBusyError(InfluenceExplorerError):
    """The server already runs as much background work of this kind as it allows; the message
    says what is running and when to try again."""
