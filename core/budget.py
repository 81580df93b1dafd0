"""A memory budget for a process that serves many users, and what heavy work needs of it.

A server that prepares explainers, retrains models and runs experiments for anyone who asks must
refuse work it cannot hold rather than be killed by the kernel half way through everyone's
requests. :class:`MemoryBudget` is that check: before heavy work starts, its
:class:`WorkEstimate` (built by the functions here from the sizes that dominate: features n x d,
the SVM's n x n kernel, each model's p x p Hessian) is compared with what the process holds now
plus what work already admitted has reserved; work that does not fit is refused with a
:class:`~core.errors.MemoryBudgetError` saying how much it needs, how much is free, and what to
change.

The budget is ``$INFLUENCE_MEMORY_BUDGET`` (``"6G"``, ``"1500M"``, ``"40%"`` or a fraction such as
``"0.4"`` of the machine) or, by default, half of the machine's memory (the smaller of physical
memory and the cgroup's limit). Estimates are meant as upper bounds: they count every large array
a piece of work holds at once, with the copies a fit makes. ``tests/core/test_budget.py`` checks
one of them against a measurement: preparing the demo's default explainer (features from the
cache) was measured at about 150 MiB above what the process held before, and is estimated at
850 MiB, mostly a backbone's working memory that a cached preparation does not need. The other
estimates (retraining, the fragility live run) are built the same way but not measured by a test.

Nothing here imports Streamlit; the dashboard adds queueing on top (``dashboard/services``).
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import MemoryBudgetError

#: Environment variable holding the budget.
ENV_MEMORY_BUDGET = "INFLUENCE_MEMORY_BUDGET"
#: Share of the machine's memory the budget is by default.
DEFAULT_FRACTION = 0.5

_FLOAT64 = 8
_MIB = 2**20
_GIB = 2**30
#: What a backbone's forward and backward passes hold at once besides its inputs (weights,
#: activations of one batch of 64 images at 224 x 224, autograd buffers), measured for
#: EfficientNet-Lite0 (about 0.5 GiB); Inception v3 is larger.
_BACKBONE_WORKING_BYTES = {"efficientnet-lite0": 640 * _MIB, "inception-v3": 1536 * _MIB}
_DEFAULT_BACKBONE_WORKING_BYTES = 1536 * _MIB
#: Interpreter-level slack every piece of work is given on top of its arrays (temporaries, the
#: allocator's rounding).
_SLACK_BYTES = 64 * _MIB


# ----------------------------------------------------------------------------- the machine


def machine_memory_bytes() -> int:
    """Memory this process may use at most: physical memory, or the cgroup's limit if smaller."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return int(total)


def resident_bytes(pid: int | str = "self") -> int:
    """Resident memory (VmRSS) of a process, in bytes; 0 where /proc is not available."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return 0


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_budget(text: str, machine: int | None = None) -> int:
    """A budget as written by an operator, in bytes.

    Accepts a size (``"6G"``, ``"6GiB"``, ``"1500M"``, ``"2000000000"``; K, M, G and T are
    powers of 1024), a percentage (``"40%"``) or a fraction below 1 (``"0.4"``) of ``machine``.

    Raises:
        MemoryBudgetError: the text is none of these, or the budget is below 64 MiB.
    """
    machine = machine_memory_bytes() if machine is None else int(machine)
    raw = str(text).strip()
    value: float
    try:
        if raw.endswith("%"):
            value = machine * float(raw[:-1]) / 100
        elif (number := float(raw)) < 1:
            value = machine * number
        else:
            value = number
    except ValueError:
        match = _SIZE.match(raw)
        if match is None:
            raise MemoryBudgetError(
                f"{ENV_MEMORY_BUDGET}={raw[:40]!r} is not a memory size: write e.g. 6G, 1500M, "
                "40% or 0.4 (a share of the machine's memory)."
            ) from None
        unit = "bkmgt".index(match.group(2).lower() or "b")
        value = float(match.group(1)) * 1024**unit
    if not math.isfinite(value) or value < 64 * _MIB:
        raise MemoryBudgetError(
            f"{ENV_MEMORY_BUDGET}={raw[:40]!r} gives {format_bytes(value)}; the budget must be "
            "at least 64 MiB."
        )
    return int(value)


def format_bytes(value: float) -> str:
    """``value`` bytes for people: "1.4 GiB", "230 MiB"."""
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= _GIB:
        return f"{value / _GIB:.1f} GiB"
    return f"{value / _MIB:.0f} MiB"


# ----------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class WorkEstimate:
    """How much memory a piece of work needs at its peak, on top of what the process holds.

    Attributes:
        what: the work, for people ("preparing the models").
        bytes: the estimate, an upper bound.
        terms: the parts it is made of, largest first (name -> bytes), for the message.
        advice: what the user can change to need less.
    """

    what: str
    bytes: int
    terms: Mapping[str, int] = field(default_factory=dict)
    advice: str = ""

    @property
    def largest(self) -> str:
        """The term that dominates, e.g. "the RBF SVM's 12,000 x 12,000 kernel and Hessian"."""
        return max(self.terms, key=self.terms.__getitem__) if self.terms else ""


def _estimate(what: str, terms: dict[str, int], advice: str) -> WorkEstimate:
    ordered = dict(sorted(terms.items(), key=lambda item: -item[1]))
    return WorkEstimate(what, int(sum(ordered.values()) + _SLACK_BYTES), ordered, advice)


def _matrix(rows: int, cols: int, copies: float = 1.0) -> int:
    return int(copies * rows * cols * _FLOAT64)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of one convex model that its memory grows with.

    Attributes:
        label: for people, e.g. "RBF SVM on pixels".
        n_train: training points n.
        n_features: the model's feature dimension d (for the kernel SVM, n: its kernel features).
        n_outputs: scores per input C (1 for a binary model).
        backbone: the featurizer's backbone name if its inputs are a network's features ("" for
            pixels), which work that featurises new images (the attack) must run.
        sharded: the training rows live in shards on a cluster's workers (core.backend): this
            process holds only the test rows, the p x p matrices and per-test results.
    """

    label: str
    n_train: int
    n_features: int
    n_outputs: int = 1
    backbone: str = ""
    sharded: bool = False

    @property
    def n_params(self) -> int:
        return self.n_features * self.n_outputs


def _model_terms(shape: ModelShape, hessian_copies: float, name: str) -> dict[str, int]:
    p = shape.n_params
    terms = {
        f"{shape.label}: {p:,} x {p:,} {name}": _matrix(p, p, hessian_copies),
        f"{shape.label}: per-example derivatives": _matrix(shape.n_train, shape.n_outputs, 8)
        + _matrix(p, 1, 16),
    }
    if shape.n_features == shape.n_train:
        # Kernel models keep their n x n feature map; a fit's Newton steps form matrices of that
        # size too.
        terms[f"{shape.label}: {shape.n_train:,} x {shape.n_train:,} kernel"] = _matrix(
            shape.n_train, shape.n_train, 2
        )
    return terms


def preparation_estimate(
    *,
    n_train: int,
    n_test: int,
    pixel_dim: int,
    models: tuple[ModelShape, ...],
    backbone: str,
) -> WorkEstimate:
    """Preparing an explainer: pixels and backbone features of both splits, every model's fit
    (Newton with a dense p x p Hessian and its Cholesky factor, cross-validation included) and
    its influence engine (the Hessian's factor kept, self-influence precomputed).

    Args:
        n_train, n_test: images of the chosen classes.
        pixel_dim: values per image (H x W x C).
        models: each model's sizes once fitted (see :func:`explainer_estimate`).
        backbone: the feature backbone's name.
    """
    images = n_train + n_test
    terms = {
        "pixels of every image as float64": _matrix(images, pixel_dim, 2),
        f"the {backbone} backbone at work": _BACKBONE_WORKING_BYTES.get(
            backbone, _DEFAULT_BACKBONE_WORKING_BYTES
        ),
    }
    for shape in models:
        # Sharded, the training rows and every (test x train) product stay on the workers.
        if shape.sharded:
            terms[f"{shape.label}: features of the test images"] = _matrix(
                n_test, shape.n_features, 2
            )
        elif shape.n_features != shape.n_train:
            terms[f"{shape.label}: features of every image"] = _matrix(images, shape.n_features, 2)
        # Fitting: the Hessian, its factor and a trial step; the engine keeps its own factor.
        for name, size in _model_terms(shape, 4, "Hessian and Cholesky factors").items():
            terms[name] = terms.get(name, 0) + size
        per_test = shape.n_outputs + 1 if shape.sharded else shape.n_train
        terms[f"{shape.label}: test scores and distances"] = _matrix(n_test, per_test, 3)
    return _estimate(
        "preparing the models",
        terms,
        "Choose fewer training images per class in the sidebar (the RBF SVM's memory grows "
        "with the square of the training set).",
    )


def refit_estimate(what: str, models: tuple[ModelShape, ...], *, new_engine: bool) -> WorkEstimate:
    """Retraining the models one after another (verification, groups, data cleaning, the attack).

    A retrain near θ̂ takes CG steps on Hessian-vector products, but may fall back to a dense
    Newton step (a p x p Hessian and its factor); with ``new_engine`` each retrained model also
    gets its own influence engine (a factorised Hessian). Models run one at a time, so the
    largest one sets the peak.
    """
    worst: dict[str, int] = {}
    for shape in models:
        terms = _model_terms(shape, 4 if new_engine else 2, "Hessian for a Newton step")
        if shape.backbone and new_engine:
            terms[f"the {shape.backbone} backbone at work"] = _BACKBONE_WORKING_BYTES.get(
                shape.backbone, _DEFAULT_BACKBONE_WORKING_BYTES
            )
        if sum(terms.values()) > sum(worst.values()):
            worst = terms
    return _estimate(
        what,
        worst,
        "Choose fewer training images per class in the sidebar, or try again when the server "
        "is less busy.",
    )


def network_estimate(what: str, *, n_params: int, n_train: int, input_dim: int) -> WorkEstimate:
    """Training a small network and computing its influence exactly (a dense p x p Hessian, its
    eigenvalues and factor) and by iterative solvers, then retraining it."""
    terms = {
        f"the network's {n_params:,} x {n_params:,} Hessian, eigenvalues and factor": _matrix(
            n_params, n_params, 4
        ),
        "training images and per-example gradients": _matrix(n_train, input_dim + n_params, 2),
        "the training framework": 96 * _MIB,
    }
    return _estimate(what, terms, "Choose a smaller network or the quick protocol.")


# ----------------------------------------------------------------------------- the budget


@dataclass(frozen=True)
class Reservation:
    """Memory set aside for admitted work until it finishes."""

    estimate: WorkEstimate
    token: int


class MemoryBudget:
    """The process's memory budget: admits work whose estimate fits, refuses the rest.

    What is in use is the process's resident memory now plus what admitted, unfinished work has
    reserved (its estimate): work admitted a moment ago may not have allocated yet, and counting
    it twice once it has is the safe side. Thread-safe.

    Args:
        limit: the budget in bytes.
        resident: returns the process's resident memory now (default: this process's VmRSS).
    """

    def __init__(self, limit: int, resident: Callable[[], int] = resident_bytes) -> None:
        if limit <= 0:
            raise MemoryBudgetError(f"the memory budget must be positive; got {limit!r}.")
        self.limit = int(limit)
        self._resident = resident
        self._lock = threading.Lock()
        self._reserved: dict[int, WorkEstimate] = {}
        self._next = 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> MemoryBudget:
        """The budget ``$INFLUENCE_MEMORY_BUDGET`` sets, else half of the machine's memory.

        Raises:
            MemoryBudgetError: the variable is set to something that is not a budget.
        """
        environ = os.environ if environ is None else environ
        machine = machine_memory_bytes()
        text = environ.get(ENV_MEMORY_BUDGET, "").strip()
        return cls(parse_budget(text, machine) if text else int(DEFAULT_FRACTION * machine))

    @property
    def reserved(self) -> int:
        """Bytes reserved by admitted work that has not finished."""
        with self._lock:
            return sum(e.bytes for e in self._reserved.values())

    @property
    def running(self) -> int:
        """Pieces of admitted work that have not finished."""
        with self._lock:
            return len(self._reserved)

    def resident(self) -> int:
        return int(self._resident())

    def free(self) -> int:
        """Bytes still available: the limit less resident memory and reservations."""
        return self.limit - self.resident() - self.reserved

    def fits(self, estimate: WorkEstimate) -> bool:
        """Whether the work fits now, next to the work already admitted."""
        return estimate.bytes <= self.free()

    def could_ever_fit(self, estimate: WorkEstimate) -> bool:
        """Whether the work would fit once the work already admitted has finished (judged by
        resident memory now, which that work's end may not lower)."""
        return estimate.bytes <= self.limit - self.resident()

    def refusal(self, estimate: WorkEstimate) -> MemoryBudgetError:
        """The error for work that does not fit: what it needs, what is free, what to change."""
        resident, reserved = self.resident(), self.reserved
        free = max(0, self.limit - resident - reserved)
        busy = f", {format_bytes(reserved)} reserved by work in progress" if reserved else ""
        largest = f" (mostly {estimate.largest})" if estimate.largest else ""
        return MemoryBudgetError(
            f"Not enough memory on this server for {estimate.what}: it needs about "
            f"{format_bytes(estimate.bytes)}{largest}, but only {format_bytes(free)} of the "
            f"server's {format_bytes(self.limit)} budget is free ({format_bytes(resident)} in "
            f"use{busy}). {estimate.advice} The operator sets the budget with "
            f"{ENV_MEMORY_BUDGET}.",
            needed=estimate.bytes,
            free=free,
        )

    def check(self, estimate: WorkEstimate) -> None:
        """Raise :class:`MemoryBudgetError` unless the work fits now."""
        if not self.fits(estimate):
            raise self.refusal(estimate)

    def reserve(self, estimate: WorkEstimate) -> Reservation:
        """Admit the work: check it fits and set its estimate aside until :meth:`release`.

        Raises:
            MemoryBudgetError: it does not fit.
        """
        with self._lock:
            free = self.limit - self.resident() - sum(e.bytes for e in self._reserved.values())
            if estimate.bytes > free:
                refused = True
            else:
                refused = False
                self._next += 1
                token = self._next
                self._reserved[token] = estimate
        if refused:
            raise self.refusal(estimate)
        return Reservation(estimate, token)

    def release(self, reservation: Reservation) -> None:
        with self._lock:
            self._reserved.pop(reservation.token, None)

    @contextmanager
    def reserved_for(self, estimate: WorkEstimate) -> Iterator[Reservation]:
        """``with budget.reserved_for(estimate):`` admits the work for the block, or raises."""
        reservation = self.reserve(estimate)
        try:
            yield reservation
        finally:
            self.release(reservation)


__all__ = [
    "DEFAULT_FRACTION",
    "ENV_MEMORY_BUDGET",
    "MemoryBudget",
    "ModelShape",
    "Reservation",
    "WorkEstimate",
    "format_bytes",
    "machine_memory_bytes",
    "network_estimate",
    "parse_budget",
    "preparation_estimate",
    "refit_estimate",
    "resident_bytes",
]
