"""Write tests/assets/demo_reference.npz: what the demo's default explainer computes, for
``tests/core/test_demo_reference.py`` to hold later versions of the code to.

It keeps, for the bundled demo's default pair and the default configuration:

- the backbone features of the pair's first 8 training images (float32, as cached);
- the logistic regression's cross-validated λ curve (mean per λ) and the chosen λ;
- both models' θ̂;
- every estimate's scores for four test images — image 0 (the dashboard's default view) and, by
  the SVM's margin, the most confident, the nearest the boundary and the most confidently wrong
  one — and the default estimate's self-influence.

Regenerate it only when a change is meant to change these numbers (e.g. another default
backbone), and say so in the commit. It was first written by the code before issue 20's start-up
work, so the test checks that work changed no score.

Usage:
    python scripts/make_demo_reference.py [--cache-dir DIR] [--out tests/assets/demo_reference.npz]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "assets" / "demo_reference.npz"
FEATURE_IMAGES = 8


def reference_test_images(explainer) -> np.ndarray:
    """Test image 0 and, by the first model's margin on the true label, the most confident, the
    nearest the boundary and the most confidently wrong."""
    fitted = next(iter(explainer.models.values()))
    scores = np.asarray(fitted.model.decision_function(fitted.test_inputs))
    margin = scores * (2 * np.asarray(explainer.test_labels) - 1)
    chosen = [0, int(np.argmax(margin)), int(np.argmin(np.abs(margin))), int(np.argmin(margin))]
    return np.array(list(dict.fromkeys(chosen)), dtype=np.int64)


def reference_arrays(explainer) -> dict[str, np.ndarray]:
    images = reference_test_images(explainer)
    arrays: dict[str, np.ndarray] = {"test_images": images}
    train = explainer.dataset.train_images[:FEATURE_IMAGES]
    arrays["features"] = explainer.backbone.transform(train)
    for key, fitted in explainer.models.items():
        engine = fitted.engine
        arrays[f"{key}/theta"] = fitted.model.theta_.numpy()
        scores = engine.score_estimates(fitted.test_inputs[images], explainer.test_labels[images])
        for name, value in scores.items():
            arrays[f"{key}/scores/{name}"] = np.asarray(value)
        arrays[f"{key}/self_influence"] = np.asarray(engine.self_influence(engine.default_estimate))
        if fitted.lambda_curve is not None:
            arrays[f"{key}/lambda_curve"] = np.array(fitted.lambda_curve.mean)
            arrays[f"{key}/lambda_chosen"] = np.array(fitted.lambda_curve.chosen)
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, help="artifact cache (default: a new one)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    sys.path.append(str(REPO_ROOT))  # after PYTHONPATH, so another checkout can be measured
    from core.data import load_demo
    from core.explainer import Explainer
    from core.store import ArtifactStore

    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="demo-reference-"))
    explainer = Explainer(load_demo(), store=ArtifactStore(cache)).prepare()
    arrays = reference_arrays(explainer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
