"""Every class of the full Fashion-MNIST (60,000 training images): both models, timed by stage.

Usage: ``python -m bench.full_fashion_mnist [--dataset fashion-mnist] [--cache-dir DIR]
[--svm-sizes 1000,10000] [--uploads 5] [--features stand-in]``

What it measures, in one process (so the peak memory is the whole preparation's):

1. the machine's float64 GEMM rate now (:func:`core.linalg.gemm_rate`), before and after;
2. ``Explainer(fashion-mnist, ExplainerConfig(classes="all")).prepare()`` with the defaults, each
   stage timed from the explainer's own progress reports: the logistic regression's λ (at
   60,000 images one stratified hold-out split, 4 fits: :func:`core.selection.selection_plan`),
   its final fit, the RBF SVM (exact or Nyström, as
   :func:`core.models.make_rbf_svm` chooses; median-heuristic γ), each model's Hessian and
   Cholesky factor, and the Newton-corrected forms Q_j;
3. one uploaded image (a test image re-encoded as a light-background PNG, decoded like an upload)
   explained by both models: the first call and the median of ``--uploads`` more;
4. peak resident memory (VmHWM) of the process;
5. the SVM's test accuracy at smaller training sets (seeded per-class subsamples, every class,
   the whole test split) with the default γ rule and with the paper's 0.05/n.

FLOPs next to each time: the dense stages' counts are exact formulas for what the code does
(C(C-1)/2 symmetric blocks of n·d²·(1 + 256/d) each in the class basis, p³/3 for a Cholesky
factor and 2p³/3 for the inverse with p = d·(C - 1)); the fits' counts are from their recorded Newton and conjugate-gradient iterations
(4·n·d·C per gradient or Hessian-vector product), so they are estimates of the same kind. Features must be cached first (``python -m
core precompute --dataset fashion-mnist --classes all``, or any command with the same cache);
computing them is not part of the timed preparation.

``--features stand-in`` replaces EfficientNet-Lite0 by a fixed random ReLU projection of the
pixels to 1280-d (seeded; computed in about ten seconds instead of the backbone's 13 minutes
for the 70,000 images on two cores, 769 s measured at load 1-3.7), registered for this process
only under its own name, so nothing is cached as if it were EfficientNet's. The dense stages'
cost depends on n, d and C alone; the fits' also on how many conjugate-gradient iterations the
features need, and the stand-in's accuracy is not EfficientNet's (it is reported as the
stand-in's). ``--features backbone`` measures the real thing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import (
    RESULTS_DIR,
    markdown_table,
    peak_rss_bytes,
    write_results,
)

GIB = 2**30


def register_stand_in() -> str:
    """Register the stand-in featurizer (see the module docstring); returns its name."""
    import torch

    from core import features

    class RandomReLU(features.Featurizer):
        name = "random-relu-1280"
        label = "random ReLU projection of the pixels, 1280-d (stand-in)"
        dim = 1280
        version = "1:x/127.5-1,seed0-gaussian/sqrt(D),bias0.1,relu"
        dtype = torch.float32

        def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.to(torch.float64).reshape(x.shape[0], -1) / 127.5 - 1.0
            if (
                getattr(self, "_projection", None) is None
                or self._projection[0].shape[0] != flat.shape[1]
            ):
                generator = torch.Generator().manual_seed(0)
                weights = torch.randn(flat.shape[1], 1280, generator=generator, dtype=torch.float64)
                bias = torch.randn(1280, generator=generator, dtype=torch.float64) * 0.1
                self._projection = (weights / flat.shape[1] ** 0.5, bias)
            weights, bias = self._projection
            return torch.relu(flat @ weights + bias).to(torch.float32)

    features._REGISTRY[RandomReLU.name] = RandomReLU
    return RandomReLU.name


class StageClock:
    """A ``progress(stage, done, total)`` that records when each stage was first and last seen."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.order: list[str] = []
        self.origin = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter() - self.origin
        if stage not in self.first:
            self.first[stage] = now
            self.order.append(stage)
        self.last[stage] = now

    def seconds(self, stage: str) -> float:
        return self.last[stage] - self.first[stage]


class FitRecorder:
    """Records every LinearModel fit's FitInfo (bench-only instrumentation by wrapping fit)."""

    def __init__(self) -> None:
        self.fits: list[dict] = []

    def __enter__(self) -> FitRecorder:
        from core.models import LinearModel

        self._original = LinearModel._fit_parameters
        recorder = self

        def recording(model, theta0):  # type: ignore[no-untyped-def]
            recorder._original(model, theta0)
            info = model.fit_info_
            recorder.fits.append(
                {
                    "model": type(model).__name__,
                    "l2": float(model.l2),
                    "n": int(model.features_.shape[0]),
                    "d": int(model.features_.shape[1]),
                    "outputs": int(model.n_outputs_),
                    "newton": info.iterations,
                    "cg": info.cg_iterations,
                    "seconds": info.seconds,
                }
            )

        LinearModel._fit_parameters = recording
        return self

    def __exit__(self, *exc: object) -> None:
        from core.models import LinearModel

        LinearModel._fit_parameters = self._original


def fit_flops(fit: dict) -> float:
    """Flops of one Newton fit from its iterations (see the module docstring)."""
    from core.models import DENSE_NEWTON_MAX_PARAMS

    n, d, c = fit["n"], fit["d"], fit["outputs"]
    p = d * c
    product = 4.0 * n * d * c
    per_step = 2 * product  # gradient at the iterate and at least one line-search point
    if p <= DENSE_NEWTON_MAX_PARAMS:
        per_step += hessian_build_flops(n, d, c) + p**3 / 3
        return fit["newton"] * per_step
    return fit["newton"] * per_step + fit["cg"] * product


def class_columns(c: int) -> int:
    """Class columns a Hessian is formed in: C - 1 in the class basis (both models' multi-class
    losses are shift-invariant, :class:`core.models.ClassBasisHessian`), 1 for binary models."""
    return c - 1 if c >= 2 else c


def hessian_build_flops(n: int, d: int, c: int) -> float:
    h = class_columns(c)
    return h * (h + 1) / 2 * n * d * d * (1 + min(1.0, 256 / d))


def upload_bytes(image: np.ndarray) -> bytes:
    """A dark object on a light background, 4x larger, RGB PNG: what a phone photo looks like."""
    from PIL import Image

    light = 255 - np.repeat(image, 3, axis=2) if image.shape[2] == 1 else 255 - image
    buffer = io.BytesIO()
    size = (image.shape[1] * 4, image.shape[0] * 4)
    Image.fromarray(light.astype(np.uint8)).resize(size).save(buffer, format="PNG")
    return buffer.getvalue()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def profile_text(fn: Callable[[], object], lines: int) -> str:
    """One more call of ``fn`` under cProfile: its ``lines`` most expensive functions by
    cumulative time (where an upload's time goes), as pstats prints them."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(fn)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(lines)
    return text.getvalue()


def svm_accuracy(dataset, per_class: int | None, gamma_rule: str, seed: int = 0) -> dict:
    """Fit the explainer's SVM (same construction) on a seeded per-class subsample."""
    import torch

    from core.explainer import ExplainerConfig, _subsample
    from core.features import PixelFeaturizer
    from core.models import NystroemSVM, make_rbf_svm, rbf_gamma

    rows = _subsample(dataset.train_labels, per_class, seed, tuple(range(dataset.n_classes)))
    pixels = PixelFeaturizer()
    X = torch.as_tensor(pixels.transform(dataset.train_images[rows]), dtype=torch.float64)
    y = dataset.train_labels[rows]
    X_test = torch.as_tensor(pixels.transform(dataset.test_images), dtype=torch.float64)
    gamma = rbf_gamma(gamma_rule, X, seed=seed)
    config = ExplainerConfig()
    model = make_rbf_svm(
        len(y), dataset.n_classes, gamma=gamma, temperature=config.svm_temperature, l2=config.svm_l2
    )
    start = time.perf_counter()
    model.fit(X, y)
    seconds = time.perf_counter() - start
    kind = (
        f"Nyström, {model.features_.shape[1]} landmarks"
        if isinstance(model, NystroemSVM)
        else "exact"
    )
    return {
        "n": len(y),
        "gamma_rule": gamma_rule,
        "gamma": gamma,
        "kind": kind,
        "params": model.n_params_,
        "fit_s": seconds,
        "newton": model.fit_info_.iterations,
        "test_accuracy": model.accuracy(X_test, dataset.test_labels),
        "train_accuracy": model.accuracy(X, y),
    }


def run(args: argparse.Namespace) -> dict:
    import torch

    from core.data import open_dataset
    from core.explainer import Explainer, ExplainerConfig
    from core.images import decode_upload
    from core.linalg import gemm_rate
    from core.store import ArtifactStore

    out: dict = {"threads": torch.get_num_threads()}
    out["gemm_gflops_before"] = gemm_rate()
    out["load_before"] = os.getloadavg()
    dataset = open_dataset(args.dataset)
    store = ArtifactStore(args.cache_dir)
    backbone = register_stand_in() if args.features == "stand-in" else ExplainerConfig().backbone
    out["backbone"] = backbone
    explainer = Explainer(dataset, ExplainerConfig(classes="all", backbone=backbone), store=store)
    cost = explainer.cost()
    if cost.uncached_images and not (args.compute_features or args.features == "stand-in"):
        raise SystemExit(
            f"{cost.uncached_images} images have no cached features in {store.root}; run "
            f"`python -m core precompute --dataset {args.dataset} --classes all --cache-dir "
            f"{store.root}` first (or pass --compute-features)."
        )
    clock = StageClock()
    with FitRecorder() as recorder:
        start = time.perf_counter()
        explainer.prepare(clock)
        out["prepare_s"] = time.perf_counter() - start
    out["peak_after_prepare_bytes"] = peak_rss_bytes()
    out["stages"] = [
        {"stage": s, "start_s": clock.first[s], "seconds": clock.seconds(s)} for s in clock.order
    ]
    out["fits"] = recorder.fits
    out["n_train"], out["n_classes"] = explainer.n_train, len(explainer.class_names)
    out["svm"] = cost.svm
    summaries = explainer.summaries()
    out["models"] = {
        key: {
            "label": s.label,
            "features": s.features,
            "test_accuracy": s.test_accuracy,
            "train_accuracy": s.train_accuracy,
            "hyperparameters": s.hyperparameters,
            "lambda_curve": s.lambda_curve.as_dict() if s.lambda_curve else None,
            "params": explainer.models[key].model.n_params_,
            "dim": int(explainer.models[key].model.features_.shape[1]),
            "outputs": int(explainer.models[key].model.n_outputs_),
        }
        for key, s in summaries.items()
    }
    image = explainer.dataset.test_images[7]
    data = upload_bytes(image)
    shape = explainer.dataset.image_shape

    def explain_upload() -> object:
        decoded = decode_upload(data, target_shape=shape, light_on_dark=dataset.light_on_dark)
        return explainer.explain(image=decoded.image, k=10)

    out["upload_first_s"] = timed(explain_upload)
    out["upload_s"] = [timed(explain_upload) for _ in range(args.uploads)]
    explanation = explain_upload()
    out["upload_profile"] = profile_text(explain_upload, args.profile_lines)
    out["upload_predictions"] = {
        key: m.predicted_name
        for key, m in explanation.models.items()  # type: ignore[attr-defined]
    }
    out["peak_bytes"] = peak_rss_bytes()
    out["gemm_gflops_after"] = gemm_rate()
    out["load_after"] = os.getloadavg()
    # The preparation's figures are kept even if a later stage fails.
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.name}.json").write_text(json.dumps(out, indent=1, default=str))
    out["svm_sizes"] = []
    for size in args.svm_sizes:
        per_class = size // dataset.n_classes
        for rule in ("median", "paper"):
            result = svm_accuracy(dataset, per_class, rule)
            result["load"] = os.getloadavg()
            out["svm_sizes"].append(result)
    return out


def _split(out: dict) -> str:
    """How λ was chosen, from the run's curve (the rule's first clause)."""
    curve = out["models"]["logreg"].get("lambda_curve")
    if not curve:
        return "a fixed value"
    return curve["rule"].split(", held-out")[0]


def stage_flops(out: dict) -> dict[str, float]:
    """FLOPs per recorded stage (see the module docstring)."""
    flops: dict[str, float] = {}
    fits = out["fits"]
    cv = [f for f in fits if f["model"] == "LogisticRegression"][:-1]
    final_logreg = [f for f in fits if f["model"] == "LogisticRegression"][-1:]
    svm_fits = [f for f in fits if f["model"] != "LogisticRegression"]
    for stage in (s["stage"] for s in out["stages"]):
        if "λ" in stage:
            flops[stage] = sum(fit_flops(f) for f in cv)
        elif stage.startswith("Fitting the logistic"):
            flops[stage] = sum(fit_flops(f) for f in final_logreg)
        elif stage.startswith("Fitting the RBF SVM"):
            flops[stage] = sum(fit_flops(f) for f in svm_fits)
        else:
            for model in out["models"].values():
                if stage.startswith(model["label"]):
                    n, d, c = out["n_train"], model["dim"], model["outputs"]
                    p = d * class_columns(c)
                    if "factorisation" in stage:
                        flops[stage] = hessian_build_flops(n, d, c) + p**3 / 3
                    elif "Newton-corrected" in stage:
                        flops[stage] = 2 * p**3 / 3 + hessian_build_flops(n, d, c)
    return flops


def report(out: dict) -> str:
    gemm = max(out["gemm_gflops_before"], out["gemm_gflops_after"])
    flops = stage_flops(out)
    rows = []
    for item in out["stages"]:
        stage, seconds = item["stage"], item["seconds"]
        f = flops.get(stage)
        rate = f / seconds / 1e9 if f and seconds > 0 else None
        rows.append(
            [
                stage,
                f"{seconds:.1f}",
                "" if f is None else f"{f:.3g}",
                "" if rate is None else f"{rate:.1f}",
                "" if rate is None else f"{rate / gemm:.0%}",
            ]
        )
    logreg_stages = [
        s
        for s in out["stages"]
        if "λ" in s["stage"] or s["stage"].startswith("Fitting the logistic")
    ]
    logreg_label = out["models"]["logreg"]["label"]
    logreg_stages += [
        s
        for s in out["stages"]
        if s["stage"].startswith(logreg_label) and "factorisation" in s["stage"]
    ]
    target = sum(s["seconds"] for s in logreg_stages)
    uploads = out["upload_s"]
    lines = [
        f"Fashion-MNIST, every class: n = {out['n_train']:,} training images, "
        f"{out['n_classes']} classes, test split whole. Explainer defaults (RBF SVM: "
        f"{out['svm']}, median-heuristic γ, t = 0.1; logistic regression on "
        f"{out['models']['logreg']['features']}, λ chosen by {_split(out)}). "
        f"{out['threads']} torch threads."
        + (
            " **Stand-in features**: the logistic regression's times are those of a 1280-d, "
            "10-class problem of this size; its accuracy is not EfficientNet-Lite0's."
            if out["backbone"] != "efficientnet-lite0"
            else ""
        ),
        "",
        f"Measured float64 GEMM rate: {out['gemm_gflops_before']:.1f} GFLOP/s before, "
        f"{out['gemm_gflops_after']:.1f} after (load average {out['load_before'][0]:.2f} before, "
        f'{out["load_after"][0]:.2f} after); "of GEMM" is a stage\'s rate over the better of the two.',
        "",
        "### Goals",
        "",
        markdown_table(
            ["goal", "measured", "verdict"],
            [
                [
                    "logistic regression fit + λ selection + Hessian factorisation < 5 min",
                    f"{target:.0f} s",
                    "met" if target < 300 else "missed",
                ],
                [
                    "one uploaded image explained by both models < 1 s",
                    f"{statistics.median(uploads):.2f} s median of {len(uploads)} "
                    f"(first {out['upload_first_s']:.2f} s)",
                    "met" if statistics.median(uploads) < 1 else "missed",
                ],
                [
                    "peak memory < 8 GiB",
                    f"{out['peak_bytes'] / GIB:.2f} GiB (VmHWM of the whole run)",
                    "met" if out["peak_bytes"] < 8 * GIB else "missed",
                ],
            ],
        ),
        "",
        f"Whole preparation: {out['prepare_s']:.0f} s.",
        "",
        "### Stages",
        "",
        markdown_table(["stage", "seconds", "FLOPs", "GFLOP/s", "of GEMM"], rows),
        "",
        "### Models",
        "",
        markdown_table(
            ["model", "features", "parameters", "test accuracy", "train accuracy", "settings"],
            [
                [
                    m["label"],
                    m["features"],
                    f"{m['params']:,}",
                    f"{m['test_accuracy']:.4f}",
                    f"{m['train_accuracy']:.4f}",
                    ", ".join(f"{k}={v:g}" for k, v in m["hyperparameters"].items()),
                ]
                for m in out["models"].values()
            ],
        ),
        "",
        "Fits (Newton steps, conjugate-gradient iterations, seconds): "
        + "; ".join(
            f"{f['model']} λ={f['l2']:g} n={f['n']}: {f['newton']}, {f['cg']}, {f['seconds']:.1f}"
            for f in out["fits"]
        ),
        "",
        f"Upload predictions: {out['upload_predictions']}.",
    ]
    if out.get("upload_profile"):
        lines += [
            "",
            "### Where one upload's time goes",
            "",
            "One more upload under cProfile (its own overhead included), by cumulative time:",
            "",
            "```",
            out["upload_profile"].strip(),
            "```",
        ]
    if out["svm_sizes"]:
        lines += [
            "",
            "### RBF SVM test accuracy by training-set size",
            "",
            "Seeded per-class subsamples of the training set, every class, the whole test split; "
            "the explainer's construction (make_rbf_svm, t = 0.1, λ = 1e-3). The 60k row of the "
            "default is the explainer's model above.",
            "",
            markdown_table(
                ["n", "γ rule", "γ", "model", "test accuracy", "train accuracy", "fit s", "load"],
                [
                    [
                        f"{r['n']:,}",
                        r["gamma_rule"],
                        f"{r['gamma']:.3g}",
                        r["kind"],
                        f"{r['test_accuracy']:.4f}",
                        f"{r['train_accuracy']:.4f}",
                        f"{r['fit_s']:.1f}",
                        f"{r['load'][0]:.1f}",
                    ]
                    for r in out["svm_sizes"]
                ],
            ),
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument(
        "--svm-sizes",
        default="1000,10000",
        help="training-set sizes for the SVM accuracy table ('' for none)",
    )
    parser.add_argument("--uploads", type=int, default=5)
    parser.add_argument("--compute-features", action="store_true")
    parser.add_argument(
        "--features",
        choices=("backbone", "stand-in"),
        default="backbone",
        help="EfficientNet-Lite0 features (cached first) or the random ReLU stand-in",
    )
    parser.add_argument("--name", default="full_fashion_mnist", help="results file name")
    parser.add_argument(
        "--profile-lines", type=int, default=40, help="functions kept from the upload's profile"
    )
    args = parser.parse_args()
    args.svm_sizes = [int(s) for s in args.svm_sizes.split(",") if s.strip()]
    out = run(args)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.name}.json").write_text(json.dumps(out, indent=1, default=str))
    path = write_results(
        args.name,
        "Every class of the full Fashion-MNIST",
        report(out),
        module="full_fashion_mnist",
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
