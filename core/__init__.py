"""Influence Explorer's engine: data, features, convex models, influence, verification.

The front door for Python users::

    from core import LogisticRegression, InfluenceEngine, top_k, verify

    model = LogisticRegression(l2=1e-3).fit(X, y)          # your (n, d) features and labels
    engine = InfluenceEngine(model)                          # exact solver by default
    scores = engine.influence_scores(X_test[:1], y_test[:1])[0]   # (n,) test-loss units
    print(top_k(scores, 5).helpful, verify(engine, X_test[:1], y_test[:1], k=20)[0].agreement)

A score is the test loss after removing the training point minus the loss with it: positive
helped, negative hurt (docs/architecture.md). Names are imported on first use, so ``import core``
stays cheap (the command line starts without loading torch until it needs it).

The dashboard imports this package; this package never imports the dashboard or Streamlit.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_PUBLIC: dict[str, str] = {
    # models
    "LogisticRegression": "core.models",
    "KernelSVM": "core.models",
    "NystroemSVM": "core.models",
    "LinearModel": "core.models",
    # influence
    "InfluenceEngine": "core.influence",
    "SolverConfig": "core.influence",
    "TwiceDifferentiable": "core.influence",
    "ExampleCurvature": "core.influence",
    "TopK": "core.influence",
    "top_k": "core.influence",
    "top_k_by_magnitude": "core.influence",
    "ESTIMATES": "core.influence",
    # verification
    "verify": "core.validation",
    "loo_retrain": "core.validation",
    "retrain_without": "core.validation",
    "agreement": "core.validation",
    "Agreement": "core.validation",
    "Verification": "core.validation",
    # choosing λ
    "select_l2": "core.selection",
    "SelectionConfig": "core.selection",
    "LambdaCurve": "core.selection",
    # data and the explainer
    "Dataset": "core.data",
    "open_dataset": "core.data",
    "load_demo": "core.data",
    "Explainer": "core.explainer",
    "ExplainerConfig": "core.explainer",
    "FittedModel": "core.explainer",
    "Explanation": "core.explainer",
    # your own network and data
    "NetworkSpec": "core.user_network",
    "NetworkUploads": "core.user_network",
    "DatasetUploads": "core.archive",
    "UploadLimits": "core.archive",
    # applications
    "groups": "core.groups",
    "mislabel": "core.mislabel",
    "attack": "core.attack",
    # running on a Dask cluster (imports Dask only when used)
    "backend": "core.backend",
    # errors
    "InfluenceExplorerError": "core.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module_name = _PUBLIC.get(name)
    if module_name is None:
        raise AttributeError(f"module 'core' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    # A submodule itself ("groups") or a name defined in it.
    value = module if module_name == f"core.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
