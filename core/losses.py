"""Per-example losses of the convex models, with closed-form first and second derivatives.

Every loss here is a function of the model's scores ``s = Wᵀφ`` (one score per output column) and
the label, so the models share one set of formulas for gradients, Hessians and their low-rank
per-example factors (which the Newton-corrected influence estimate needs). ``value`` is plain torch
and differentiable, so tests check the closed forms against ``torch.func`` and the perturbation
influence differentiates through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossDerivatives(NamedTuple):
    """Closed-form loss and derivatives with respect to the scores.

    Attributes:
        loss: (n,) per-example loss.
        d1: (n, C) first derivative with respect to the scores.
        d2: (n, C, C) second derivative with respect to the scores.
        factor: (n, C, r) with ``d2 = factor @ factorᵀ`` (r = C for the softmax, 1 otherwise).
    """

    loss: torch.Tensor
    d1: torch.Tensor
    d2: torch.Tensor
    factor: torch.Tensor


class Loss(ABC):
    """A convex per-example loss of the scores ``s`` (n, C) and integer labels ``y`` (n,)."""

    #: Number of score columns for a problem with ``n_classes`` classes.
    @abstractmethod
    def n_outputs(self, n_classes: int) -> int: ...

    @abstractmethod
    def value(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Differentiable per-example loss. Returns: (n,)."""

    @abstractmethod
    def derivatives(self, scores: torch.Tensor, labels: torch.Tensor) -> LossDerivatives:
        """Closed-form loss, gradient and Hessian with respect to the scores."""


def _softplus(x: torch.Tensor) -> torch.Tensor:
    # log(1 + eˣ) = -log σ(-x): exact in value and in its first two derivatives everywhere
    # (torch's softplus switches to x above 20, and logaddexp's second derivative is NaN far
    # out; the closed forms are checked against autodiff of this).
    return -F.logsigmoid(-x)


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


class SoftmaxCrossEntropy(Loss):
    """Multiclass cross-entropy of softmax(s), one score column per class."""

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
        # diag(p) - p pᵀ = B Bᵀ with B = diag(√p) - p √pᵀ, because Σ p = 1.
        root = probs.sqrt()
        factor = torch.diag_embed(root) - probs[:, :, None] * root[:, None, :]
        return LossDerivatives(loss, d1, d2, factor)
