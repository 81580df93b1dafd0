"""Influence of every training point on test points, by our engine and by each peer library.

Every method takes the same fitted binary logistic regression (θ̂ from our float64 Newton fit,
objective R(θ) = (1/n) Σ ℓ_i + (λ/2)‖θ‖², no intercept) and returns an (m, n) matrix in OUR
convention, score = (1/n) ∇ℓ_testᵀ H⁻¹ ∇ℓ_j with H = ∇²R (positive = helped). How each peer's
convention maps onto ours is stated next to each call, and checked by the benchmark (the exact peers
agree with our exact scores to ~1e-12 relative, which they could not with a wrong sign or scale).

λ in each peer's terms:
- a peer whose Hessian is of the *mean* training loss (pyDVL, dattri, kronfluence) adds λ·I;
- Captum's influence functions use the *summed* loss (its Hessian is Σ∇²ℓ_i), so they add n·λ·I
  (``hessian_reg``) and their score g_tᵀ(Σ∇²ℓ + nλI)⁻¹g_j is already ours; the others return
  g_tᵀ H⁻¹ g_j and are divided by n.

Peers run in float64 (the model, data and, where there is a setting, the solver) except where a
library casts internally (dattri's LiSSA batches are cast to float32).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

Tensor = torch.Tensor

#: Facts about the problem a method may use, set by the benchmark before it runs a method
#: (e.g. "cg_iterations": how many CG steps our solver needed to reach 1e-10).
HINTS: dict[str, float] = {}
#: Our last run's dense steps as its solver timed them (``core.linalg.StageCost`` as dicts), for
#: the benchmark's FLOP-limit table; empty after a peer's run.
LAST_STAGES: list[dict] = []
# (X, y, X_test, y_test, theta, l2) -> (m, n) scores in our convention
MethodFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, float], np.ndarray]


@dataclass(frozen=True)
class Method:
    """One way of computing the score matrix.

    Attributes:
        key: command-line name.
        library: "ours", "captum 0.9.0", ...
        label: what it is, with the settings that matter.
        quantity: "first order" (the paper's influence), "corrected" (ours, Newton step without
            the point) or "gradient similarity" (TracIn: no Hessian, a different quantity).
        run: the function.
    """

    key: str
    library: str
    label: str
    quantity: str
    run: MethodFn


# ----------------------------------------------------------------------------- shared pieces
def torch_model(theta: Tensor) -> nn.Module:
    """Our binary model as a torch module: logits = x·θ (no bias), float64."""
    model = nn.Linear(theta.shape[0], 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(theta.reshape(1, -1))
    model.eval()
    return model


def bce_mean(output: Tensor, target: Tensor) -> Tensor:
    """Mean logistic loss; targets 0/1 as float, shaped like the logits."""
    return F.binary_cross_entropy_with_logits(output, target.reshape(output.shape))


def _float_targets(y: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    return y.to(dtype).reshape(-1, 1)


def _checkpoint(model: nn.Module, directory: Path) -> str:
    path = directory / "checkpoint.pt"
    torch.save(model.state_dict(), path)
    return str(path)


# ----------------------------------------------------------------------------- ours
def _ours(method: str, estimate: str, form: str = "auto") -> MethodFn:
    def run(X, y, Xt, yt, theta, l2):
        from core.influence import InfluenceEngine, SolverConfig
        from core.models import LogisticRegression

        # Warm start at θ̂: zero Newton steps, it only stores the data and derivatives (the
        # peers get the same fitted θ̂ as a state dict).
        model = LogisticRegression(l2=l2).fit(X, y, theta0=theta)
        engine = InfluenceEngine(model, SolverConfig(method=method, exact_form=form))
        scores = engine.influence_scores(Xt, yt, estimate=estimate)
        stages = getattr(engine.solver, "stages", None)
        LAST_STAGES[:] = [dataclasses.asdict(s) for s in stages.entries] if stages else []
        return scores

    return run


def _ours_float32(X, y, Xt, yt, theta, l2):
    """Our exact first-order algebra with every dense step in float32 (benchmark only: what
    float32 would save and what it costs in accuracy). The loss derivatives come from our float64
    model; the Gram or Hessian matrix, its Cholesky factor and the solves are float32, in the
    dual form when n < d as the engine's exact solver does."""
    from core.models import LogisticRegression

    model = LogisticRegression(l2=l2).fit(X, y, theta0=theta)
    derivs = model.training_derivatives()
    n, d = X.shape
    a = (derivs.factor[:, 0, 0] / n**0.5).float()  # √(c_j / n)
    r = derivs.d1[:, 0].float()
    test = model.loss_.derivatives(model.scores(model.transform(Xt)), torch.as_tensor(yt)).d1
    Xf, G = X.float(), (Xt * test).float()  # G: test gradients (m, d), binary model
    if n < d:
        gram = Xf @ Xf.T
        small = gram * a[:, None] * a[None, :] + l2 * torch.eye(n)
        chol = torch.linalg.cholesky(small)
        projected = Xf @ G.T  # (n, m)
        z = a[:, None] * torch.cholesky_solve(a[:, None] * projected, chol)
        solved = (projected - gram @ z) / l2  # Φ H⁻¹ g_t
    else:
        hessian = (Xf * (a * a)[:, None]).T @ Xf + l2 * torch.eye(d)
        solved = Xf @ torch.cholesky_solve(G.T, torch.linalg.cholesky(hessian))
    LAST_STAGES.clear()
    return (solved.T * r[None, :] / n).double().numpy()


# ----------------------------------------------------------------------------- Captum
def _captum_naive(projection_dim: int | None, hessian_reg: float | None) -> MethodFn:
    """Captum's NaiveInfluenceFunction: explicit Hessian of the summed loss, eigendecomposed.

    ``hessian_reg=None`` means n·λ (our λ in its summed-loss convention); ``projection_dim=None``
    keeps every eigenvector (no low-rank truncation).
    """

    def run(X, y, Xt, yt, theta, l2):
        from captum.influence import NaiveInfluenceFunction

        n = X.shape[0]
        model = torch_model(theta)
        with tempfile.TemporaryDirectory() as tmp:
            influence = NaiveInfluenceFunction(
                model,
                torch.utils.data.TensorDataset(X, _float_targets(y)),
                _checkpoint(model, Path(tmp)),
                loss_fn=nn.BCEWithLogitsLoss(reduction="sum"),
                batch_size=n,
                sample_wise_grads_per_batch=True,
                projection_dim=projection_dim,
                hessian_reg=n * l2 if hessian_reg is None else hessian_reg,
            )
            scores = influence.influence((Xt, _float_targets(yt)), k=None)
        # Summed-loss Hessian (Σ∇²ℓ + nλI) = n·H, so g_tᵀ(nH)⁻¹g_j is our score already.
        return scores.detach().numpy()

    return run


def _captum_arnoldi(projection_dim: int | None, arnoldi_dim: int | None, reg: bool) -> MethodFn:
    def run(X, y, Xt, yt, theta, l2):
        from captum.influence._core.arnoldi_influence_function import (
            ArnoldiInfluenceFunction,
        )

        n, p = X.shape
        model = torch_model(theta)
        options = {}
        # -1 means the full parameter dimension p (no truncation).
        if projection_dim is not None:
            options["projection_dim"] = p if projection_dim == -1 else projection_dim
        if arnoldi_dim is not None:
            options["arnoldi_dim"] = p if arnoldi_dim == -1 else arnoldi_dim
        if reg:
            options["hessian_reg"] = n * l2
        with tempfile.TemporaryDirectory() as tmp:
            influence = ArnoldiInfluenceFunction(
                model,
                torch.utils.data.TensorDataset(X, _float_targets(y)),
                _checkpoint(model, Path(tmp)),
                loss_fn=nn.BCEWithLogitsLoss(reduction="sum"),
                batch_size=n,
                sample_wise_grads_per_batch=True,
                **options,
            )
            scores = influence.influence((Xt, _float_targets(yt)), k=None)
        return scores.detach().numpy()

    return run


def _captum_tracin(X, y, Xt, yt, theta, l2):
    from captum.influence import TracInCP

    n = X.shape[0]
    model = torch_model(theta)
    with tempfile.TemporaryDirectory() as tmp:
        tracin = TracInCP(
            model,
            torch.utils.data.TensorDataset(X, _float_targets(y)),
            [_checkpoint(model, Path(tmp))],
            loss_fn=nn.BCEWithLogitsLoss(reduction="sum"),
            batch_size=n,
            sample_wise_grads_per_batch=True,
        )
        scores = tracin.influence((Xt, _float_targets(yt)), k=None)
    # g_tᵀ g_j at the final checkpoint (learning rate 1): no Hessian, so not our quantity; it is
    # scaled by 1/n only to be of a comparable order and is compared by ranking and LOO Pearson.
    return scores.detach().numpy() / n


# ----------------------------------------------------------------------------- pyDVL
def _pydvl(kind: str, **options) -> MethodFn:
    def run(X, y, Xt, yt, theta, l2):
        from pydvl.influence import InfluenceMode
        from pydvl.influence.torch import (
            ArnoldiInfluence,
            CgInfluence,
            DirectInfluence,
            LissaInfluence,
        )

        n = X.shape[0]
        model = torch_model(theta)
        settings = dict(options)
        batch = settings.pop("batch_size", n)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(X, _float_targets(y)), batch_size=batch
        )
        cls = {
            "direct": DirectInfluence,
            "cg": CgInfluence,
            "lissa": LissaInfluence,
            "arnoldi": ArnoldiInfluence,
        }[kind]
        if kind == "lissa" and settings.get("scale") == "auto":
            settings["scale"] = 2.0 * _largest_eigenvalue(X, theta, l2)
        # pyDVL's Hessian is of the mean loss over the loader; `regularization` adds λ·I.
        influence = cls(model, bce_mean, regularization=l2, **settings).fit(loader)
        scores = influence.influences(
            Xt, _float_targets(yt), X, _float_targets(y), InfluenceMode.Up
        )
        # ⟨H⁻¹∇ℓ_test, ∇ℓ_j⟩ (pyDVL docs): ours divides by n.
        return scores.detach().numpy() / n

    return run


def _largest_eigenvalue(X: Tensor, theta: Tensor, l2: float) -> float:
    """Largest eigenvalue of H = (1/n) Xᵀ diag(σ(1-σ)) X + λI (for LiSSA's scale)."""
    s = torch.sigmoid(X @ theta)
    curvature = s * (1 - s)
    v = torch.ones(X.shape[1], dtype=X.dtype)
    for _ in range(100):
        w = X.T @ (curvature * (X @ v)) / X.shape[0] + l2 * v
        v = w / w.norm()
    return float(v @ (X.T @ (curvature * (X @ v)) / X.shape[0] + l2 * v))


# ----------------------------------------------------------------------------- dattri
def _dattri(kind: str, **options) -> MethodFn:
    def run(X, y, Xt, yt, theta, l2):
        from dattri.algorithm.influence_function import (
            IFAttributorCG,
            IFAttributorExplicit,
            IFAttributorLiSSA,
        )
        from dattri.task import AttributionTask

        n, m = X.shape[0], Xt.shape[0]
        if kind == "lissa":
            # dattri's LiSSA casts every sampled batch to float32 (its collate function), so the
            # whole problem runs in float32 for it.
            X, Xt, theta = X.float(), Xt.float(), theta.float()
        model = torch_model(theta).to(X.dtype)

        def loss_func(params, data):
            features, target = data
            logits = torch.func.functional_call(model, params, (features,))
            return bce_mean(logits, target)

        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
        settings = dict(options)
        if kind == "lissa":
            if settings.get("scaling") == "auto":
                settings["scaling"] = 2.0 * _largest_eigenvalue(X.double(), theta.double(), l2)
            # dattri's recursion h ← v + (1 - damping)·h - H̃h/scaling has the fixed point
            # (H + scaling·damping·I)⁻¹ v, so our λ is damping = λ / scaling.
            attributor = IFAttributorLiSSA(task, damping=l2 / settings["scaling"], **settings)
        elif kind == "cg":
            if settings.get("max_iter") == "auto":
                # dattri's CG runs exactly max_iter steps (no residual test under vmap) and
                # returns NaN once a residual reaches exactly zero, so it gets the number of
                # steps our CG needed for a relative residual of 1e-10.
                settings["max_iter"] = int(HINTS.get("cg_iterations", 100))
            attributor = IFAttributorCG(task, regularization=l2, **settings)
        else:
            attributor = IFAttributorExplicit(task, regularization=l2, **settings)
        train = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(X, _float_targets(y, X.dtype)),
            batch_size=n,
            shuffle=False,
        )
        test = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(Xt, _float_targets(yt, X.dtype)),
            batch_size=m,
            shuffle=False,
        )
        # The Hessian is of loss_func on the cached loader's batch (one batch = the mean loss).
        attributor.cache(train)
        scores = attributor.attribute(train, test)
        # (n_train, n_test) of ∇ℓ_jᵀ H⁻¹ ∇ℓ_test: transpose and divide by n.
        return scores.detach().to(torch.float64).numpy().T / n

    return run


# ----------------------------------------------------------------------------- kronfluence
def _kronfluence(strategy: str) -> MethodFn:
    def run(X, y, Xt, yt, theta, l2):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task

        n, m = X.shape[0], Xt.shape[0]

        class BinaryLogisticTask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                features, target = batch
                logits = model(features)
                if sample:
                    # True Fisher (kronfluence's default): labels drawn from the model; for a
                    # logistic regression its expectation is the exact Hessian of the loss.
                    with torch.no_grad():
                        target = torch.bernoulli(torch.sigmoid(logits))
                return F.binary_cross_entropy_with_logits(
                    logits, target.reshape(logits.shape), reduction="sum"
                )

            def compute_measurement(self, batch, model):
                features, target = batch
                logits = model(features)
                return F.binary_cross_entropy_with_logits(
                    logits, target.reshape(logits.shape), reduction="sum"
                )

        task = BinaryLogisticTask()
        # kronfluence wraps the *children* of the model it is given (a bare nn.Linear as the root
        # recurses forever), so the layer goes inside a Sequential.
        model = prepare_model(nn.Sequential(torch_model(theta)), task)
        dtype = torch.float64
        factor_args = FactorArguments(
            strategy=strategy,
            activation_covariance_dtype=dtype,
            gradient_covariance_dtype=dtype,
            eigendecomposition_dtype=dtype,
            per_sample_gradient_dtype=dtype,
            lambda_dtype=dtype,
        )
        # Its Fisher is the mean over examples; damping_factor adds λ·I (absolute, not relative).
        score_args = ScoreArguments(
            damping_factor=l2,
            per_sample_gradient_dtype=dtype,
            precondition_dtype=dtype,
            score_dtype=dtype,
        )
        train = torch.utils.data.TensorDataset(X, _float_targets(y))
        query = torch.utils.data.TensorDataset(Xt, _float_targets(yt))
        with tempfile.TemporaryDirectory() as tmp:
            analyzer = Analyzer(
                "bench", model, task, cpu=True, disable_tqdm=True, output_dir=tmp, log_level=40
            )
            analyzer.fit_all_factors(
                "factors", dataset=train, per_device_batch_size=n, factor_args=factor_args
            )
            analyzer.compute_pairwise_scores(
                "scores",
                "factors",
                query_dataset=query,
                train_dataset=train,
                per_device_query_batch_size=m,
                per_device_train_batch_size=n,
                score_args=score_args,
            )
            scores = analyzer.load_pairwise_scores("scores")["all_modules"]
        # g_queryᵀ (F + λI)⁻¹ g_train with the mean Fisher: divide by n.
        return scores.detach().to(torch.float64).numpy() / n

    return run


# ----------------------------------------------------------------------------- registry
METHODS: tuple[Method, ...] = (
    Method(
        "ours-exact",
        "ours",
        "exact (Cholesky; dual form when n < d), first order",
        "first order",
        _ours("exact", "first_order"),
    ),
    Method(
        "ours-exact-primal",
        "ours",
        "exact (Cholesky of the p x p Hessian, primal form forced), first order",
        "first order",
        _ours("exact", "first_order", form="primal"),
    ),
    Method(
        "ours-exact-float32",
        "ours",
        "exact algebra with float32 dense steps (benchmark only), first order",
        "first order",
        _ours_float32,
    ),
    Method(
        "ours-exact-corrected",
        "ours",
        "exact (Cholesky; dual form when n < d), Newton-corrected",
        "corrected",
        _ours("exact", "corrected"),
    ),
    Method(
        "ours-cg", "ours", "CG (tol 1e-10), first order", "first order", _ours("cg", "first_order")
    ),
    Method(
        "captum-naive-default",
        "captum 0.9.0",
        "NaiveInfluenceFunction, defaults (projection_dim 50, hessian_reg 1e-6)",
        "first order",
        _captum_naive(50, 1e-6),
    ),
    Method(
        "captum-naive-full",
        "captum 0.9.0",
        "NaiveInfluenceFunction, projection_dim None (all eigenvectors), hessian_reg n·λ",
        "first order",
        _captum_naive(None, None),
    ),
    Method(
        "captum-arnoldi-default",
        "captum 0.9.0",
        "ArnoldiInfluenceFunction, defaults (projection_dim 50, arnoldi_dim 200, hessian_reg 1e-3)",
        "first order",
        _captum_arnoldi(None, None, reg=False),
    ),
    Method(
        "captum-arnoldi-full",
        "captum 0.9.0",
        "ArnoldiInfluenceFunction, arnoldi_dim = projection_dim = p, hessian_reg n·λ",
        "first order",
        _captum_arnoldi(-1, -1, reg=True),
    ),
    Method(
        "captum-tracincp",
        "captum 0.9.0",
        "TracInCP, final checkpoint, lr 1",
        "gradient similarity",
        _captum_tracin,
    ),
    Method(
        "pydvl-direct",
        "pydvl 0.10.0",
        "DirectInfluence (explicit Hessian), regularization λ",
        "first order",
        _pydvl("direct"),
    ),
    Method(
        "pydvl-cg",
        "pydvl 0.10.0",
        "CgInfluence, block CG, rtol 1e-10, atol 1e-14, regularization λ",
        "first order",
        _pydvl("cg", rtol=1e-10, atol=1e-14, solve_simultaneously=True, maxiter=10_000),
    ),
    Method(
        "pydvl-lissa",
        "pydvl 0.10.0",
        "LissaInfluence, maxiter 1000 (default), scale 2·λ_max, batches of 64, regularization λ",
        "first order",
        _pydvl(
            "lissa",
            scale="auto",
            maxiter=1000,
            rtol=1e-10,
            batch_size=64,
            warn_on_max_iteration=False,
        ),
    ),
    Method(
        "pydvl-arnoldi",
        "pydvl 0.10.0",
        "ArnoldiInfluence, rank 200, Woodbury (exact λ·I), regularization λ",
        "first order",
        _pydvl("arnoldi", rank=200, use_woodbury=True),
    ),
    Method(
        "dattri-explicit",
        "dattri 0.3.0",
        "IFAttributorExplicit, regularization λ",
        "first order",
        _dattri("explicit"),
    ),
    Method(
        "dattri-cg",
        "dattri 0.3.0",
        "IFAttributorCG, max_iter = our CG's iterations to 1e-10, regularization λ",
        "first order",
        _dattri("cg", max_iter="auto"),
    ),
    Method(
        "dattri-lissa",
        "dattri 0.3.0",
        "IFAttributorLiSSA, depth 5000 (default), batch 64, scaling 2·λ_max, damping λ/scaling, float32",
        "first order",
        _dattri("lissa", recursion_depth=5000, batch_size=64, scaling="auto"),
    ),
    Method(
        "kronfluence-ekfac",
        "kronfluence 1.0.1",
        "EK-FAC, true Fisher, damping λ, float64",
        "first order",
        _kronfluence("ekfac"),
    ),
)

METHODS_BY_KEY = {m.key: m for m in METHODS}
