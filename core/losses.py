"""Per-example losses of the convex models, with closed-form first and second derivatives.

Every loss here is a function of the model's scores ``s = Wᵀφ`` (one score per output column) and
the label, so the models share one set of formulas for gradients, Hessians and their low-rank
per-example factors (which the Newton-corrected influence estimate needs). ``value`` is plain torch
and differentiable, so tests check the closed forms against ``torch.func`` and the perturbation
influence differentiates through it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossDerivatives(NamedTuple):
    """Closed-form loss and derivatives with respect to the scores.

    Attributes:
        loss: (n,) per-example loss.
        d1: (n, C) first derivative with respect to the scores.
        d2: (n, C, C) second derivative with respect to the scores.
        factor: (n, C, r) with ``d2 = factor @ factorᵀ`` (r = C - 1 for the softmax and the
            multiclass smooth hinge, their Hessians' rank (:func:`softmax_factor`); 1 for the
            one-column binary losses).
    """

    loss: torch.Tensor
    d1: torch.Tensor
    d2: torch.Tensor
    factor: torch.Tensor


def curvature_rows(
    d2: torch.Tensor, scale: torch.Tensor, k: int
) -> Callable[[int, int, torch.Tensor], torch.Tensor]:
    """The row-wise map of a Hessian-vector product for :func:`core.linalg.through_rows`: rows
    start:stop's C x C loss curvature ``d2`` (n, C, C), times ``scale`` (n,), on their C·k
    scores (columns (class, vector)). Shared by the in-process and the sharded products."""
    c = d2.shape[1]

    def curvature(start: int, stop: int, s: torch.Tensor) -> torch.Tensor:
        t = torch.bmm(d2[start:stop], s.reshape(stop - start, c, k))
        return (t * scale[start:stop, None, None]).reshape(stop - start, c * k)

    return curvature


def softmax_factor(probs: torch.Tensor) -> torch.Tensor:
    """B (n, C, C - 1) with B Bᵀ = diag(p) - p pᵀ for every row p of ``probs`` (n, C).

    The square root diag(√p) - p √pᵀ is C x C, but √p is in its null space (Σ p = 1). A
    Householder reflection per row, H = I - 2 v vᵀ / vᵀv with v = √p + e_C (vᵀv >= 2, so stable
    however confident the row), maps e_C to -√p; the root times H has that null direction as its
    last column, exactly zero, and the other C - 1 columns keep B Bᵀ. One column fewer is what
    the dual Newton step and the Newton-corrected estimate work with (n·(C - 1) instead of n·C:
    2,400 instead of 3,600 for a three-class fold of 1,200 images).
    """
    root = probs.sqrt()
    full = torch.diag_embed(root) - probs[:, :, None] * root[:, None, :]
    v = root.clone()
    v[:, -1] += 1.0
    along = torch.einsum("ncd,nd->nc", full, v) * (2.0 / (v * v).sum(1))[:, None]
    return (full - along[:, :, None] * v[:, None, :])[:, :, :-1]


class Loss(ABC):
    """A convex per-example loss of the scores ``s`` (n, C) and integer labels ``y`` (n,)."""

    #: Whether ℓ(s + c·1) = ℓ(s) for every constant c: the loss depends on the differences of
    #: the scores only, so its Hessian in the scores has the all-ones vector in its null space
    #: (what :meth:`core.models.LinearModel.class_basis_hessian` uses).
    shift_invariant: bool = False

    #: Number of score columns for a problem with ``n_classes`` classes.
    @abstractmethod
    def n_outputs(self, n_classes: int) -> int: ...

    @abstractmethod
    def value(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Differentiable per-example loss. Returns: (n,)."""

    @abstractmethod
    def derivatives(self, scores: torch.Tensor, labels: torch.Tensor) -> LossDerivatives:
        """Closed-form loss, gradient and Hessian with respect to the scores."""

    def value_change(
        self, scores: torch.Tensor, changes: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """ℓ(s + Δs) - ℓ(s) for k score changes of each of m examples, accurate also when the
        change is tiny next to the loss (what the exact-in-the-margin influence estimate needs).

        This generic version takes the difference of the two values, or, where the change is
        below 1e-6 of what rounding affects (ℓ itself and s + Δs), the second-order Taylor
        expansion ∇ℓᵀΔs + ½ΔsᵀHΔs from the closed-form derivatives: about 1e-7 relative in the
        worst case. The losses below override it with exact closed forms.

        Args:
            scores: (m, C) scores s; changes: (m, k, C) changes Δs; labels: (m,).
        Returns:
            (m, k) loss changes.
        """
        base = self.derivatives(scores, labels)
        direct = self._moved_values(scores, changes, labels) - base.loss[:, None]
        taylor = torch.einsum("mc,mkc->mk", base.d1, changes) + 0.5 * torch.einsum(
            "mkc,mcd,mkd->mk", changes, base.d2, changes
        )
        rounded = base.loss.abs() + (base.d1.abs() * scores.abs()).sum(-1)
        return torch.where(taylor.abs() <= 1e-6 * rounded[:, None], taylor, direct)

    def _moved_values(
        self, scores: torch.Tensor, changes: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """ℓ(s + Δs) for (m, C) scores and (m, k, C) changes. Returns: (m, k)."""
        m, k, c = changes.shape
        moved = (scores[:, None, :] + changes).reshape(m * k, c)
        return self.value(moved, labels.repeat_interleave(k)).reshape(m, k)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    # log(1 + eˣ) = -log σ(-x): exact in value and in its first two derivatives everywhere
    # (torch's softplus switches to x above 20, and logaddexp's second derivative is NaN far
    # out; the closed forms are checked against autodiff of this).
    return -F.logsigmoid(-x)


def _softplus_change(u: torch.Tensor, du: torch.Tensor) -> torch.Tensor:
    """softplus(u + du) - softplus(u) without cancellation.

    For |du| <= 1 it is log((1 + e^{u+du}) / (1 + e^u)) = log1p(σ(u)·expm1(du)), whose argument
    stays in (-0.64, 1.72) where log1p is well conditioned; beyond, the two values differ by a
    large share of either and their difference is accurate.
    """
    near = du.abs() <= 1
    small = torch.log1p(torch.sigmoid(u) * torch.expm1(torch.where(near, du, 0.0)))
    return torch.where(near, small, _softplus(u + du) - _softplus(u))


def _signs(labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Binary labels 0/1 become -1/+1 so the loss is a function of the margin y·s.
    return (2 * labels - 1).to(dtype)


class LogisticLoss(Loss):
    """Binary logistic loss log(1 + exp(-y·s)), labels 0/1, one score column."""

    def n_outputs(self, n_classes: int) -> int:
        return 1

    def value(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        margin = _signs(labels, scores.dtype) * scores[..., 0]
        return _softplus(-margin)

    def derivatives(self, scores: torch.Tensor, labels: torch.Tensor) -> LossDerivatives:
        sign = _signs(labels, scores.dtype)
        margin = sign * scores[:, 0]
        loss = _softplus(-margin)
        d1 = (-torch.sigmoid(-margin) * sign)[:, None]
        curvature = torch.sigmoid(margin) * torch.sigmoid(-margin)
        return LossDerivatives(loss, d1, curvature[:, None, None], curvature.sqrt()[:, None, None])

    def value_change(
        self, scores: torch.Tensor, changes: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        if scores.shape[-1] != 1:
            return super().value_change(scores, changes, labels)
        sign = _signs(labels, scores.dtype)
        # ℓ = softplus(-y·s), so the change is softplus's at u = -y·s by du = -y·Δs.
        return _softplus_change(-(sign * scores[:, 0])[:, None], -sign[:, None] * changes[..., 0])


class SmoothHingeLoss(Loss):
    """The paper's smooth hinge t·log(1 + exp((1 - y·s)/t)), labels 0/1, one score column.

    As the temperature t goes to 0 this becomes the hinge max(0, 1 - y·s); its curvature,
    σ(u)σ(-u)/t with u = (1 - y·s)/t, concentrates on points near the margin.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = float(temperature)

    def n_outputs(self, n_classes: int) -> int:
        return 1

    def value(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        margin = _signs(labels, scores.dtype) * scores[..., 0]
        return t * _softplus((1.0 - margin) / t)

    def derivatives(self, scores: torch.Tensor, labels: torch.Tensor) -> LossDerivatives:
        t = self.temperature
        sign = _signs(labels, scores.dtype)
        u = (1.0 - sign * scores[:, 0]) / t
        loss = t * _softplus(u)
        d1 = (-torch.sigmoid(u) * sign)[:, None]
        curvature = torch.sigmoid(u) * torch.sigmoid(-u) / t
        return LossDerivatives(loss, d1, curvature[:, None, None], curvature.sqrt()[:, None, None])

    def value_change(
        self, scores: torch.Tensor, changes: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        if scores.shape[-1] != 1:
            return super().value_change(scores, changes, labels)
        t = self.temperature
        sign = _signs(labels, scores.dtype)
        # ℓ = t·softplus(u), u = (1 - y·s)/t, which moves by -y·Δs/t.
        u = ((1.0 - sign * scores[:, 0]) / t)[:, None]
        return t * _softplus_change(u, -sign[:, None] * changes[..., 0] / t)


class MulticlassSmoothHinge(Loss):
    """Crammer and Singer's multiclass hinge, smoothed with the temperature t; one score column
    per class, C >= 3 classes.

        ℓ(s, y) = t·log(1 + Σ_{c≠y} exp((1 + s_c - s_y)/t)),

    a smooth maximum of the C - 1 margin violations 1 + s_c - s_y and 0, so as t goes to 0 it
    becomes the hinge max(0, 1 + max_{c≠y} s_c - s_y). With two classes and the difference of
    the two scores as the one parameter (s = s_1 - s_0) it is exactly :class:`SmoothHingeLoss`,
    the paper's binary model, which the SVM keeps for two classes.

    It is t times the softmax cross-entropy of the loss-augmented scores v = (s + 1 - e_y)/t
    (the label's own score gets no margin): log Σ_c exp(v_c) - v_y is the expression above. So
    with p = softmax(v) the derivatives are those of the softmax scaled by the temperature:
    gradient p - e_y, Hessian (diag(p) - p pᵀ)/t, of rank C - 1 (adding a constant to every
    score changes nothing), with :func:`softmax_factor` over √t as its factor.
    """

    shift_invariant = True

    def __init__(self, temperature: float) -> None:
        self.temperature = float(temperature)

    def n_outputs(self, n_classes: int) -> int:
        return n_classes

    def _augmented(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # A comparison rather than F.one_hot, which torch.func.vmap cannot batch.
        classes = torch.arange(scores.shape[-1], device=scores.device)
        own = (labels[..., None].long() == classes).to(scores.dtype)
        return (scores + 1.0 - own) / self.temperature

    def value(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        v = self._augmented(scores, labels)
        own = torch.gather(v, -1, labels[..., None].long())[..., 0]
        return self.temperature * (torch.logsumexp(v, dim=-1) - own)

    def derivatives(self, scores: torch.Tensor, labels: torch.Tensor) -> LossDerivatives:
        t = self.temperature
        log_probs = torch.log_softmax(self._augmented(scores, labels), dim=1)
        probs = log_probs.exp()
        loss = -t * torch.gather(log_probs, 1, labels[:, None].long())[:, 0]
        d1 = probs - F.one_hot(labels.long(), scores.shape[1]).to(scores.dtype)
        d2 = (torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]) / t
        factor = softmax_factor(probs) / math.sqrt(t)
        return LossDerivatives(loss, d1, d2, factor)


class SoftmaxCrossEntropy(Loss):
    """Multiclass cross-entropy of softmax(s), one score column per class."""

    shift_invariant = True

    def n_outputs(self, n_classes: int) -> int:
        return n_classes

    def value(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(scores, dim=-1)
        return -torch.gather(log_probs, -1, labels[..., None].long())[..., 0]

    def derivatives(self, scores: torch.Tensor, labels: torch.Tensor) -> LossDerivatives:
        log_probs = torch.log_softmax(scores, dim=1)
        probs = log_probs.exp()
        loss = -torch.gather(log_probs, 1, labels[:, None].long())[:, 0]
        d1 = probs - F.one_hot(labels.long(), scores.shape[1]).to(scores.dtype)
        d2 = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        return LossDerivatives(loss, d1, d2, softmax_factor(probs))

    def value_change(
        self, scores: torch.Tensor, changes: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        # With δ_c = Δs_c - Δs_y: ℓ(s + Δs) - ℓ(s) = log Σ_c p_c e^{δ_c} = log1p(Σ_c p_c expm1(δ_c)).
        # For |δ| <= 1 the sum stays above -0.64, where log1p is well conditioned; beyond, the
        # difference of the two values is a large share of them and accurate.
        probs = torch.softmax(scores, dim=-1)
        index = labels[:, None, None].long().expand(-1, changes.shape[1], 1)
        delta = changes - torch.gather(changes, 2, index)
        near = delta.abs().amax(-1) <= 1
        inside = torch.where(near[..., None], delta, 0.0)
        small = torch.log1p((probs[:, None, :] * torch.expm1(inside)).sum(-1))
        direct = self._moved_values(scores, changes, labels) - self.value(scores, labels)[:, None]
        return torch.where(near, small, direct)
