"""Interactive latency: from an uploaded image to both models' explanations; start-up and memory.

Usage: ``python -m bench.latency [--uploads 50] [--skip-cold] [--skip-large] [--skip-verify]
[--app PATH] [--startup-runs 3]``; ``python -m bench.latency --verify-only`` measures Verify alone
and writes ``bench/results/latency_verify.md``, ``--startup-only`` the cold and warm start alone
(``bench/results/latency_startup.md``), ``--large-only [--profile FILE]`` the uploads at n = 60k
alone (``bench/results/latency_large.md``).

- **Uploads**: 50 PNG files made from demo test images the way a user's photo would arrive:
  upscaled 10x to 280x280, RGB, dark garment on a light background (so ``decode_upload`` must
  resize and invert). Each is timed end to end: ``decode_upload`` -> ``Explainer.explain`` (both
  models: pixels for the SVM, the EfficientNet-Lite0 forward pass for the logistic regression,
  scores of every training image, top 10 helpful and harmful), after 3 untimed warm-up uploads.
  p50 and p95 over the 50.
- **Demo size**: the bundled demo's default pair (n = 1000), the real explainer.
- **Larger size**: n = 60,000 (all of Fashion-MNIST, upper-body garments vs the rest), the real
  ``Explainer.explain`` (everything an explanation computes: predictions, scores of every training
  image, top 10 each way, pixel and feature distances to every training image, the familiarity
  check) on an explainer with its own defaults: the RBF SVM is ``make_rbf_svm``'s ``NystroemSVM``
  (1000 landmarks; the exact kernel does not fit in memory at 60k, see ``bench.scale``), median
  γ, t = 0.1. The logistic regression (λ = 1e-3, not cross-validated) sees **stand-in features**
  (the fixed random ReLU projection of ``bench.scale``), because EfficientNet-Lite0 features for
  70k images take ~40 min here; each upload still pays a real EfficientNet-Lite0 forward pass,
  timed as its own stage, so the timed pipeline is the same work as the demo's. Each stage is
  reported with p50 and p95 over the uploads, its FLOPs and the least bytes it must move, and the
  time those take at this machine's measured GEMM rate and memory bandwidth.
- **Start-up**: the demo's default view — both models explaining test image 0, what the
  dashboard's Explain page first shows — from an empty cache directory (cold: backbone features,
  λ by cross-validation, both fits, engines) and then ``--startup-runs`` times from what that
  cached (warm), each in a new process: the process's wall time from its start, and stage by
  stage from ``Explainer.prepare``'s progress reports (the interpreter's start and the imports
  are the process's time less the rest). Then ``influence precompute`` with an empty cache
  directory, end to end, as issue 3 asked.
- **Memory**: peak resident memory of a process holding the demo explainer and serving the
  uploads, and of the dashboard app (``--app``, run headless through Streamlit's AppTest, plus the
  resident size of an idle ``streamlit run`` server).
- **Verify**: ``Explainer.verify(test_index=i, k=50)`` on the demo, what the dashboard's Verify
  page calls (both models, each retrained without each of its top 50 by |score| to
  ‖∇R‖ <= 1e-11), for test images of every kind (by the SVM's margin: the most confident, the
  nearest the boundary, the most confidently wrong, then random ones), the median of 3 runs each
  after one warm-up. Then the same work stage by stage per model (median of 3 runs each): scores
  and the top k, the preconditioners' set-up (the Hessian without each point,
  ``BatchRefit.setup_seconds``), the batched quasi-Newton steps, the test losses and agreement;
  and, on the first images, the one-at-a-time path it replaced (``retrain_without(batched=False)``)
  with the largest difference.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from bench.common import markdown_table, peak_rss_bytes, write_results
from bench.scale import FEATURE_DIM
from core.features import Featurizer

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def make_uploads(images: np.ndarray, count: int, seed: int = 0) -> list[bytes]:
    """PNG bytes of dark-on-light, 10x upscaled RGB versions of light-on-dark 28x28 images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = rng.choice(len(images), count, replace=len(images) < count)
    out = []
    for row in rows:
        gray = 255 - images[row][..., 0]
        img = Image.fromarray(gray, mode="L").resize((280, 280), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        img.convert("RGB").save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def percentiles(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


def time_demo_uploads(count: int) -> dict:
    """Warm start of the demo explainer, then decode + explain for each upload."""
    from core.data import load_demo
    from core.explainer import Explainer
    from core.images import decode_upload

    dataset = load_demo()
    start = time.perf_counter()
    explainer = Explainer(dataset).prepare()
    warm_start = time.perf_counter() - start
    uploads = make_uploads(explainer.dataset.test_images, count + 3)
    shape, light = explainer.dataset.image_shape, explainer.dataset.light_on_dark
    totals, decodes, cpu = [], [], []
    for i, data in enumerate(uploads):
        cpu_start = time.process_time()
        start = time.perf_counter()
        image = decode_upload(data, target_shape=shape, light_on_dark=light).image
        decoded = time.perf_counter()
        explanation = explainer.explain(image=image, k=10)
        end = time.perf_counter()
        assert len(explanation.models) == 2
        if i >= 3:
            totals.append(end - start)
            decodes.append(decoded - start)
            # CPU seconds of all this process's threads: what the upload costs regardless of
            # how many other processes compete for the two cores.
            cpu.append(time.process_time() - cpu_start)
    # The backbone's share: one image through EfficientNet-Lite0, as explain does it.
    backbone = explainer.models["logreg"].featurizer
    image = decode_upload(uploads[0], target_shape=shape, light_on_dark=light).image
    forward = []
    for _ in range(10):
        start = time.perf_counter()
        backbone.transform(image[None])
        forward.append(time.perf_counter() - start)
    return {
        "n_train": explainer.n_train,
        "warm_start_s": warm_start,
        "totals": totals,
        "decodes": decodes,
        "cpu": cpu,
        "backbone_s": statistics.median(forward),
        "peak_bytes": peak_rss_bytes(),
    }


class StandInFeaturizer(Featurizer):
    """bench.scale's stand-in for EfficientNet-Lite0 features at n = 60k (see the module
    docstring): ReLU(W x + b) of pixels x in [-1, 1], W and b the fixed Gaussians of
    ``bench.scale.random_relu_features`` (drawn once here, not per image)."""

    name = "bench-stand-in-relu"
    label = "stand-in (random ReLU projection of the pixels)"
    dim = FEATURE_DIM
    version = "bench.scale.random_relu_features(seed=0)"
    dtype = torch.float64

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        d_in = 28 * 28
        weights = torch.randn(d_in, FEATURE_DIM, generator=generator, dtype=torch.float64)
        self.weights = weights / d_in**0.5
        self.bias = torch.randn(FEATURE_DIM, generator=generator, dtype=torch.float64) * 0.1

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.to(torch.float64).reshape(x.shape[0], -1) / 127.5 - 1.0
        return torch.relu(pixels @ self.weights + self.bias)


def large_explainer(progress: bool = False):
    """The explainer of the large stage: every Fashion-MNIST image, upper-body garments vs the
    rest, the explainer's own defaults (RBF SVM by ``make_rbf_svm``: Nyström, 1000 landmarks,
    median γ, t = 0.1), the logistic regression (λ = 1e-3, not cross-validated) on stand-in
    features. Features and fitted parameters are cached in the artifact store like any
    explainer's, so a second run only refits from the cached θ̂."""
    from bench.scale import UPPER_BODY
    from core.data import Dataset, open_dataset
    from core.explainer import Explainer, ExplainerConfig

    full = open_dataset("fashion-mnist")
    dataset = Dataset(
        name="Fashion-MNIST, upper-body garments vs the rest",
        class_names=("other", "upper body"),
        train_images=full.train_images,
        train_labels=np.isin(full.train_labels, UPPER_BODY).astype(np.int64),
        train_ids=full.train_ids,
        test_images=full.test_images,
        test_labels=np.isin(full.test_labels, UPPER_BODY).astype(np.int64),
        test_ids=full.test_ids,
        source=full.source,
        light_on_dark=full.light_on_dark,
    )
    explainer = Explainer(dataset, ExplainerConfig(logreg_l2=1e-3))
    explainer.backbone = StandInFeaturizer()
    explainer.model_specs = (
        explainer.model_specs[0],
        ("logreg", f"Logistic regression on {explainer.backbone.label} features", "LR"),
    )

    def report(stage: str, done: int, total: int) -> None:
        if progress and done in (0, total):
            print(f"  {stage}: {done}/{total}", file=sys.stderr, flush=True)

    return explainer.prepare(progress=report)


def time_large_uploads(count: int, profile: Path | None = None) -> dict:
    """Uploads explained by the real ``Explainer.explain`` at n = 60k (see the module docstring),
    each stage timed: decoding, the EfficientNet-Lite0 forward pass an upload pays (the stand-in
    features come from the pixels), and the explanation's own stages."""
    from core.features import get_featurizer
    from core.images import decode_upload
    from core.linalg import gemm_rate, memory_bandwidth

    start = time.perf_counter()
    explainer = large_explainer(progress=True)
    prepare = time.perf_counter() - start
    backbone = get_featurizer("efficientnet-lite0")
    data = explainer.dataset
    uploads = make_uploads(data.test_images, count + 3)
    shape, light = data.image_shape, data.light_on_dark
    totals, cpu, loads = [], [], []
    stages: dict[str, list[float]] = {}
    work: dict[str, tuple[float, float]] = {}

    def upload(data_bytes: bytes) -> dict[str, float]:
        times = {}
        start = time.perf_counter()
        image = decode_upload(data_bytes, target_shape=shape, light_on_dark=light).image
        times["decode"] = time.perf_counter() - start
        start = time.perf_counter()
        backbone.transform(image[None])  # what the demo's upload pays; the stand-in is below
        times["EfficientNet-Lite0 forward pass"] = time.perf_counter() - start
        explanation = explainer.explain(image=image, k=10)
        assert len(explanation.models) == 2
        stages = getattr(explanation, "stages", ())  # the explainer's own breakdown, if any
        for stage in stages:
            times[stage.name] = times.get(stage.name, 0.0) + stage.seconds
            work[stage.name] = (stage.flops, stage.bytes)
        if stages:
            times["explain: the rest (predictions, losses, the result)"] = (
                explanation.seconds - sum(stage.seconds for stage in stages)
            )
        times["explain, all of it"] = explanation.seconds
        return times

    for data_bytes in uploads[:3]:
        upload(data_bytes)  # warm-up: first calls allocate
    for data_bytes in uploads[3:]:
        loads.append(os.getloadavg()[0])
        cpu_start, start = time.process_time(), time.perf_counter()
        times = upload(data_bytes)
        totals.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        for name, seconds in times.items():
            stages.setdefault(name, []).append(seconds)
    result = {
        "n_train": explainer.n_train,
        "prepare_s": prepare,
        "totals": totals,
        "cpu": cpu,
        "loads": loads,
        "stages": stages,
        "work": work,
        "gflops": gemm_rate(),
        "bandwidth": memory_bandwidth(),
        "peak_bytes": peak_rss_bytes(),
    }
    if profile is not None:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for data_bytes in uploads[:10]:
            upload(data_bytes)
        profiler.disable()
        with profile.open("w") as out:
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("cumulative").print_stats(40)
            stats.sort_stats("tottime").print_stats(30)
    return result


def large_report(result: dict) -> tuple[str, list[str]]:
    """The large stage's breakdown as a Markdown table, and summary lines."""
    if "error" in result:
        return "", [f"- n = 60k uploads: failed: {result['error']}."]
    gflops, bandwidth = result["gflops"], result["bandwidth"]
    rows = []
    for name, values in result["stages"].items():
        p50, p95 = percentiles(values)
        flops, nbytes = result["work"].get(name, (float("nan"), float("nan")))
        limit = max(
            flops / (gflops * 1e9) if flops == flops else 0.0,
            nbytes / (bandwidth * 1e9) if nbytes == nbytes else 0.0,
        )
        rows.append(
            [
                name,
                f"{p50 * 1000:.1f}",
                f"{p95 * 1000:.1f}",
                "" if flops != flops else f"{flops / 1e6:.1f}",
                "" if nbytes != nbytes else f"{nbytes / 2**20:.0f}",
                "" if not limit else f"{limit * 1000:.1f}",
            ]
        )
    p50, p95 = percentiles(result["totals"])
    rows.append(["**upload, end to end**", f"{p50 * 1000:.1f}", f"{p95 * 1000:.1f}", "", "", ""])
    loads = result["loads"]
    table = markdown_table(
        ["stage", "p50 ms", "p95 ms", "MFLOP", "MiB moved (least)", "limit ms"], rows
    )
    lines = [
        f"- Goal 60k upload p50 < 500 ms: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms over "
        f"{len(result['totals'])} uploads, load average (1 min) {min(loads):.2f}-{max(loads):.2f}:"
        f" {'met' if p50 < 0.5 else 'missed'}. CPU time per upload (all threads, p50) "
        f"{statistics.median(result['cpu']) * 1000:.0f} ms.",
        f"- Limits measured in the same process after the uploads: float64 GEMM "
        f"{gflops:.0f} GFLOP/s, memory bandwidth (copy) {bandwidth:.1f} GB/s; a stage's limit is "
        "the larger of its FLOPs at that rate and its least bytes at that bandwidth.",
        f"- n = 60k preparation (features, both fits from the cache's θ̂ when present, engines, "
        f"self-influence, familiarity references): {result['prepare_s']:.0f} s; peak resident "
        f"memory {result['peak_bytes'] / MIB:.0f} MiB.",
    ]
    return table, lines


def verify_test_images(explainer, count: int) -> list[tuple[int, str]]:
    """Test images of every kind Verify meets, by the SVM's margin on its true label: the most
    confidently right, the nearest the boundary, the most confidently wrong, then random ones
    (seed 0) up to ``count``."""
    key = next(iter(explainer.models))
    fitted = explainer.models[key]
    scores = np.asarray(fitted.model.decision_function(fitted.test_inputs))
    labels = np.asarray(explainer.test_labels)
    if scores.ndim == 1:
        margin = scores * (2 * labels - 1)
    else:
        own = scores[np.arange(len(labels)), labels]
        rest = np.where(np.eye(scores.shape[1], dtype=bool)[labels], -np.inf, scores).max(1)
        margin = own - rest
    chosen = [
        (int(np.argmax(margin)), "confident"),
        (int(np.argmin(np.abs(margin))), "near the boundary"),
        (int(np.argmin(margin)), "wrong" if margin.min() < 0 else "least confident"),
    ]
    rng = np.random.default_rng(0)
    for index in rng.permutation(len(labels)):
        if len(chosen) >= count:
            break
        if int(index) not in {i for i, _ in chosen}:
            chosen.append((int(index), "random"))
    return chosen[:count]


def time_verify(k: int, count: int, repeats: int, compare: int) -> dict:
    """Verify with k retrains per model on the demo, as the dashboard's Verify page runs it
    (``Explainer.verify``), then the same work stage by stage, and the one-at-a-time path."""
    from core.data import load_demo
    from core.explainer import Explainer
    from core.influence import top_k_by_magnitude
    from core.models import as_labels
    from core.validation import RETRAIN_TOL, agreement, retrain_without

    explainer = Explainer(load_demo()).prepare()
    images = verify_test_images(explainer, count)
    explainer.verify(test_index=images[0][0], k=k)  # warm-up: first calls allocate
    rows = []
    for index, kind in images:
        walls, cpus, loads = [], [], []
        for _ in range(repeats):
            loads.append(os.getloadavg()[0])
            cpu_start, start = time.process_time(), time.perf_counter()
            result = explainer.verify(test_index=index, k=k)
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu_start)
            assert all(v.converged for v in result.values())
        models = {}
        for key, fitted in explainer.models.items():
            engine, model = fitted.engine, fitted.engine.model
            x = fitted.test_inputs[index : index + 1]
            y = explainer.test_labels[index : index + 1]
            # The stages of core.validation.verify, one by one (median of the repeats).
            times: dict[str, list[float]] = {"scores": [], "setup": [], "steps": [], "losses": []}
            for _ in range(repeats):
                start = time.perf_counter()
                scores = engine.score_estimates(x, y)
                chosen = top_k_by_magnitude(scores[engine.default_estimate][0], k)
                scored = time.perf_counter()
                solved = model.refit_without(
                    [[int(j)] for j in chosen],
                    tol=RETRAIN_TOL,
                    preconditioner=engine.preconditioner,
                )
                retrained = time.perf_counter()
                features = model.transform(x)
                labels = as_labels(y)
                base = model.per_example_losses(features, labels)
                d, c = features.shape[1], model.n_outputs_
                actual = np.array(
                    [
                        float(model.loss_.value(features @ w.reshape(d, c), labels)[0] - base[0])
                        for w in solved.parameters
                    ]
                )
                for estimate in engine.estimates:
                    agreement(scores[estimate][0, chosen], actual)
                compared = time.perf_counter()
                times["scores"].append(scored - start)
                times["setup"].append(solved.setup_seconds)
                times["steps"].append(solved.seconds - solved.setup_seconds)
                times["losses"].append(compared - retrained)
            models[key] = {
                "label": fitted.label,
                **{f"{stage}_s": statistics.median(values) for stage, values in times.items()},
                "steps_max": int(solved.iterations.max()),
                "steps_median": float(np.median(solved.iterations)),
                "gradient_norm_max": float(solved.gradient_norms.max()),
                "not_converged": int((~solved.converged).sum()),
                "retrains": len(chosen),
                "slope": float(result[key].agreement[engine.default_estimate].slope),
            }
            if len(rows) < compare:
                start = time.perf_counter()
                alone = retrain_without(
                    model,
                    [[int(j)] for j in chosen],
                    x,
                    y,
                    preconditioner=engine.preconditioner,
                    batched=False,
                )
                models[key]["one_at_a_time_s"] = time.perf_counter() - start
                scale = float(np.abs(alone.actual[:, 0]).max())
                models[key]["difference"] = float(np.abs(actual - alone.actual[:, 0]).max()) / scale
        rows.append(
            {
                "test": index,
                "kind": kind,
                "wall_s": statistics.median(walls),
                "cpu_s": statistics.median(cpus),
                "load": statistics.median(loads),
                "models": models,
            }
        )
    return {"k": k, "repeats": repeats, "rows": rows}


def verify_report(result: dict) -> tuple[str, list[str]]:
    """The Verify stage as a Markdown table and summary lines."""
    if "error" in result:
        return "", [f"- Verify: failed: {result['error']}."]
    k, rows = result["k"], result["rows"]
    keys = list(rows[0]["models"])
    headers = ["test image", "kind", "Verify wall ms", "CPU ms", "load (1 min)"]
    for key in keys:
        headers += [f"{key}: scores ms", "set-up ms", "quasi-Newton ms (steps max)", "losses ms"]
    table = []
    for row in rows:
        line = [
            row["test"],
            row["kind"],
            f"{row['wall_s'] * 1000:.0f}",
            f"{row['cpu_s'] * 1000:.0f}",
            f"{row['load']:.2f}",
        ]
        for key in keys:
            m = row["models"][key]
            line += [
                f"{m['scores_s'] * 1000:.1f}",
                f"{m['setup_s'] * 1000:.1f}",
                f"{m['steps_s'] * 1000:.0f} ({m['steps_max']})",
                f"{m['losses_s'] * 1000:.1f}",
            ]
        table.append(line)
    walls = [row["wall_s"] for row in rows]
    p50 = statistics.median(walls)
    lines = [
        f"- Goal Verify k = {k}, both models, < 1 s: median {p50 * 1000:.0f} ms, worst "
        f"{max(walls) * 1000:.0f} ms over {len(rows)} test images ({result['repeats']} runs each,"
        f" median), load average (1 min) {min(r['load'] for r in rows):.2f}-"
        f"{max(r['load'] for r in rows):.2f}: {'met' if max(walls) < 1 else 'missed'}.",
    ]
    for key in keys:
        models = [row["models"][key] for row in rows]
        lines.append(
            f"- {models[0]['label']}: {k} retrains per image, quasi-Newton steps median "
            f"{statistics.median(m['steps_median'] for m in models):.0f}, at most "
            f"{max(m['steps_max'] for m in models)}; largest final ‖∇R‖ "
            f"{max(m['gradient_norm_max'] for m in models):.1e}; not converged together (so "
            f"refitted one at a time): {sum(m['not_converged'] for m in models)}."
        )
        timed = [m for m in models if "one_at_a_time_s" in m]
        if timed:
            alone = statistics.median(m["one_at_a_time_s"] for m in timed)
            together = statistics.median(m["setup_s"] + m["steps_s"] for m in timed)
            lines.append(
                f"  The one-at-a-time path (`retrain_without(batched=False)`, each retrain "
                f"`model.refit` preconditioned by the exact factor) on the first {len(timed)} "
                f"images: median {alone * 1000:.0f} ms against {together * 1000:.0f} ms together;"
                f" largest difference in the actual changes "
                f"{max(m['difference'] for m in timed):.1e} of each image's largest change."
            )
    return markdown_table(headers, table), lines


def cold_precompute() -> dict:
    """``influence precompute`` on the demo with an empty cache directory, timed end to end."""
    cache = Path(tempfile.mkdtemp(prefix="ie-cold-"))
    env = dict(os.environ, INFLUENCE_CACHE_DIR=str(cache))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = [sys.executable, "-m", "core", "precompute", "--quiet", "--json"]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    shutil.rmtree(cache, ignore_errors=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:]}
    return {"seconds": seconds, "load": load, "load_after": os.getloadavg()[0]}


#: Start-up stages in report order: the explainer's progress stages are grouped under these by
#: :func:`startup_stage` (whatever falls between two reports goes to the later report's stage
#: when that report continues it, else to "other").
STARTUP_STAGES = (
    "interpreter and imports",
    "load the demo",
    "first look: the RBF SVM alone, prepared and explaining",
    "backbone features: train",
    "backbone features: test",
    "RBF SVM fit (kernel, γ, Newton)",
    "cross-validation of λ",
    "logistic regression fit",
    "engines: Hessian and factorisation",
    "Newton-corrected forms and self-influence",
    "test predictions and familiarity",
    "other (between stages)",
    "explain the default test image",
)


def startup_stage(stage: str) -> str:
    """The :data:`STARTUP_STAGES` entry an explainer progress stage belongs to."""
    if "features: train" in stage:
        return "backbone features: train"
    if "features: test" in stage:
        return "backbone features: test"
    if stage.startswith("Fitting the RBF SVM"):
        return "RBF SVM fit (kernel, γ, Newton)"
    if stage.startswith("Choosing"):
        return "cross-validation of λ"
    if stage.startswith("Fitting the logistic regression"):
        return "logistic regression fit"
    if "factorisation" in stage:
        return "engines: Hessian and factorisation"
    if "self-influence" in stage:
        return "Newton-corrected forms and self-influence"
    if "familiarity" in stage or "predictions" in stage:
        return "test predictions and familiarity"
    return "other (between stages)"


def time_startup(input_size: int | None = None) -> dict:
    """The demo's default view in this process, stage by stage: the dataset,
    ``Explainer.prepare`` (its progress reports timed) and the explanation of test image 0 by both
    models, what the dashboard's Explain page first shows. Cold or warm is the caller's cache
    directory (``INFLUENCE_CACHE_DIR``); the interpreter's start and the imports are what the
    process's wall time (:func:`startup`) adds. ``input_size``: the backbone's input side
    instead of the default's (a what-if for ``--startup-input-size``; see
    ``bench.backbone_resolution`` for what it does to accuracy)."""
    from core.data import load_demo
    from core.explainer import Explainer
    from core.features import get_featurizer

    seconds = dict.fromkeys(STARTUP_STAGES, 0.0)
    load = os.getloadavg()[0]
    cpu_start = time.process_time()
    start = time.perf_counter()
    dataset = load_demo()
    seconds["load the demo"] = time.perf_counter() - start
    last = [time.perf_counter()]

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        # A report of 0 done starts its stage: the time before it belongs to none.
        key = "other (between stages)" if done == 0 else startup_stage(stage)
        seconds[key] += now - last[0]
        last[0] = now

    from core.explainer import ExplainerConfig

    first_look_s = None
    first_look = (
        "models" in ExplainerConfig.__dataclass_fields__  # an older core has no first look
        and Explainer(dataset).cost().uncached_images > 0
    )
    if first_look:
        # What the dashboard's Explain page shows first when backbone features are missing: the
        # SVM, which needs none; the full preparation starts after it (never beside it). With
        # every feature cached the dashboard prepares both models at once, and so does this.
        look = Explainer(dataset, ExplainerConfig(models=("svm",))).prepare()
        assert len(look.explain(test_index=0, k=10).models) == 1
        first_look_s = time.perf_counter() - start
        seconds["first look: the RBF SVM alone, prepared and explaining"] = (
            first_look_s - seconds["load the demo"]
        )
        last[0] = time.perf_counter()
    explainer = Explainer(dataset)
    if input_size is not None:
        # Only in a cache of its own: the fits' cache keys name the backbone, not its input size.
        explainer.backbone = get_featurizer(explainer.config.backbone, input_size=input_size)
    explainer.prepare(progress)
    seconds["other (between stages)"] += time.perf_counter() - last[0]
    prepared = time.perf_counter()
    explanation = explainer.explain(test_index=0, k=10)
    seconds["explain the default test image"] = time.perf_counter() - prepared
    assert len(explanation.models) == len(explainer.models) == 2
    import core

    return {
        "core": str(Path(core.__file__).parent),
        "stages": seconds,
        "ready_s": time.perf_counter() - start,
        "first_look_s": first_look_s,
        "cpu_s": time.process_time() - cpu_start,
        "load": load,
        "load_after": os.getloadavg()[0],
        "chosen_l2": {
            key: fitted.lambda_curve.chosen
            for key, fitted in explainer.models.items()
            if fitted.lambda_curve is not None
        },
    }


def startup(runs: int, input_size: int | None = None, core_root: Path | None = None) -> dict:
    """Cold start (an empty cache directory) then ``runs`` warm starts from what it cached, each
    in a new process: the stage breakdown of :func:`time_startup` and the process's whole wall
    time (interpreter start, imports, default view ready). ``core_root``: a checkout whose
    ``core`` the workers import instead of this one's (this file is run as the worker, so the
    same stages are timed the same way; an older ``core`` reports fewer stages)."""
    cache = Path(tempfile.mkdtemp(prefix="ie-startup-"))
    env = dict(os.environ, INFLUENCE_CACHE_DIR=str(cache))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = f"{core_root or ROOT}{os.pathsep}" + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "bench.latency", "--worker", "startup"]
    if core_root is not None:
        command[1:3] = [str(Path(__file__).resolve())]
    if input_size is not None:
        command += ["--startup-input-size", str(input_size)]
    out: dict = {"warm": [], "input_size": input_size}
    try:
        for run in range(1 + runs):
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
            process = time.perf_counter() - start
            if done.returncode != 0:
                return {"error": done.stderr.strip().splitlines()[-1:]}
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["process_s"] = process
            result["stages"]["interpreter and imports"] = process - result["ready_s"]
            if result.get("first_look_s") is not None:
                result["first_look_process_s"] = result["first_look_s"] + (
                    process - result["ready_s"]
                )
            if run == 0:
                out["cold"] = result
            else:
                out["warm"].append(result)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return out


def precompute_line(cold: dict) -> str:
    """The end-to-end ``influence precompute`` figure, as a summary line."""
    if "seconds" not in cold:
        return f"- Cold `influence precompute` on the demo (empty cache): failed: {cold['error']}."
    return (
        f"- Cold `influence precompute` on the demo (empty cache, the process end to end): "
        f"{cold['seconds']:.1f} s, load average {cold['load']:.2f}-{cold['load_after']:.2f}."
    )


def startup_report(result: dict) -> tuple[str, list[str]]:
    """Cold and warm start as a stage table (seconds) and summary lines."""
    if "error" in result:
        return "", [f"- Start-up: failed: {result['error']}."]
    cold, warm = result["cold"], result["warm"]
    middle = sorted(warm, key=lambda r: r["ready_s"])[len(warm) // 2] if warm else None
    headers = ["stage", "cold s", "warm s (median run)"]
    rows = []
    for stage in STARTUP_STAGES:
        rows.append(
            [
                stage,
                f"{cold['stages'][stage]:.2f}",
                f"{middle['stages'][stage]:.2f}" if middle else "",
            ]
        )
    for label, key in (
        ("default view ready (without imports)", "ready_s"),
        ("CPU time of that (both threads)", "cpu_s"),
        ("process: start to default view ready", "process_s"),
        ("process: start to the first look (the SVM alone)", "first_look_process_s"),
        ("load average (1 min) at start", "load"),
    ):
        if cold.get(key) is None:
            continue
        rows.append(
            [
                f"**{label}**",
                f"{cold[key]:.2f}",
                f"{middle[key]:.2f}" if middle and middle.get(key) is not None else "",
            ]
        )
    lines = []
    if cold.get("first_look_process_s") is not None:
        lines.append(
            f"- Cold start to the first look (empty cache, a new process, the Explain page's "
            f"default view with the RBF SVM explaining test image 0 while the backbone's features "
            f"are computed): {cold['first_look_process_s']:.1f} s ({cold['first_look_s']:.1f} s "
            f"after the imports); both models follow at {cold['process_s']:.1f} s."
        )
    lines += [
        f"- Goal cold start < 20 s (empty cache to the default view: both models explaining test "
        f"image 0, in a new process): {cold['process_s']:.1f} s ({cold['ready_s']:.1f} s after "
        f"the interpreter's start and the imports), load average {cold['load']:.2f}-"
        f"{cold['load_after']:.2f}: {'met' if cold['process_s'] < 20 else 'missed'}."
    ]
    if warm:
        processes = sorted(r["process_s"] for r in warm)
        lines.append(
            f"- Goal warm start < 3 s (everything cached, a new process): "
            f"{statistics.median(processes):.2f} s (median of {len(warm)} runs, worst "
            f"{processes[-1]:.2f} s; after the interpreter's start and the imports "
            f"{statistics.median(r['ready_s'] for r in warm):.2f} s), load average "
            f"{min(r['load'] for r in warm):.2f}-{max(r['load'] for r in warm):.2f}: "
            f"{'met' if statistics.median(processes) < 3 else 'missed'}."
        )
    lines.append(f"- λ chosen in the cold run: {cold['chosen_l2']}; core from `{cold['core']}`.")
    return markdown_table(headers, rows), lines


def app_memory(app: Path) -> dict:
    """Peak RSS of the app script run headless by AppTest, and an idle server's resident size."""
    script = (
        "import json, sys\n"
        "from streamlit.testing.v1 import AppTest\n"
        "from pathlib import Path\n"
        f"at = AppTest.from_file({str(app)!r}, default_timeout=900).run()\n"
        "errors = [e.value for e in at.exception]\n"
        "status = Path('/proc/self/status').read_text().splitlines()\n"
        "peak = [int(x.split()[1]) * 1024 for x in status if x.startswith('VmHWM:')][0]\n"
        "print(json.dumps({'peak_bytes': peak, 'exceptions': errors[:3]}))\n"
    )
    env = dict(os.environ)
    # The app's own checkout first, so an app from another branch runs with its own core.
    env["PYTHONPATH"] = f"{app.parent.parent}{os.pathsep}" + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=app.parent.parent,
    )
    result = {"app": str(app)}
    if done.returncode == 0:
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))
    else:
        result["error"] = done.stderr.strip().splitlines()[-1:]
    result["server_rss_bytes"] = idle_server_rss(app, env)
    return result


def idle_server_rss(app: Path, env: dict[str, str]) -> int | None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
    ]
    server = subprocess.Popen(
        command,
        env=env,
        cwd=app.parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            return None
        for line in Path(f"/proc/{server.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return None
    finally:
        server.terminate()
        server.wait(timeout=30)


def _stage_body(
    intro: str, load_before: float, load_after: float, table: str, lines: list[str]
) -> str:
    """A one-stage results file: what it measures, the load average, its table and findings."""
    return (
        intro
        + f"\n\nLoad average (1-minute) before {load_before:.2f}, after {load_after:.2f}.\n\n"
        + table
        + "\n\n"
        + "\n".join(lines)
        + "\n"
    )


def _doc_item(name: str) -> str:
    """The module docstring's paragraph ``- **name**: ...``."""
    return ("- **" + name + __doc__.split("- **" + name, 1)[1]).split("\n- **", 1)[0].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=50)
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--skip-app", action="store_true")
    parser.add_argument("--app", type=Path, default=ROOT / "dashboard" / "streamlit_app.py")
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--verify-only", action="store_true")
    parser.add_argument("--large-only", action="store_true")
    parser.add_argument(
        "--profile", type=Path, help="with --large-only: cProfile 10 more uploads into this file"
    )
    parser.add_argument("--verify-k", type=int, default=50)
    parser.add_argument("--verify-images", type=int, default=10)
    parser.add_argument("--verify-repeats", type=int, default=3)
    parser.add_argument("--verify-compare", type=int, default=3)
    parser.add_argument("--startup-only", action="store_true")
    parser.add_argument(
        "--startup-core",
        type=Path,
        help="with --startup-only: time another checkout's core (e.g. an older revision)",
    )
    parser.add_argument(
        "--startup-input-size",
        type=int,
        help="what-if: the backbone's input side (default 224); with --startup-only only",
    )
    parser.add_argument(
        "--startup-runs", type=int, default=3, help="warm starts after the cold one"
    )
    parser.add_argument(
        "--worker", choices=("demo", "large", "verify", "startup"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.worker == "startup":
        print(json.dumps(time_startup(args.startup_input_size)))
        return
    if args.worker == "demo":
        print(json.dumps(time_demo_uploads(args.uploads)))
        return
    if args.worker == "large":
        print(json.dumps(time_large_uploads(args.uploads, args.profile)))
        return
    if args.worker == "verify":
        verify_args = (args.verify_k, args.verify_images, args.verify_repeats)
        print(json.dumps(time_verify(*verify_args, args.verify_compare)))
        return

    def child(kind: str) -> dict:
        command = [sys.executable, "-m", "bench.latency", "--worker", kind]
        command += ["--uploads", str(args.uploads)]
        if args.profile is not None:
            command += ["--profile", str(args.profile.resolve())]
        command += ["--verify-k", str(args.verify_k), "--verify-images", str(args.verify_images)]
        command += ["--verify-repeats", str(args.verify_repeats)]
        command += ["--verify-compare", str(args.verify_compare)]
        env = dict(os.environ)
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}" + env.get("PYTHONPATH", "")
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1:]}
        return json.loads(done.stdout.strip().splitlines()[-1])

    if args.verify_only:
        load_before = os.getloadavg()[0]
        verified = child("verify")
        load_after = os.getloadavg()[0]
        table, lines = verify_report(verified)
        body = _stage_body(
            ("- **Verify**" + __doc__.split("- **Verify**", 1)[1]).strip(),
            load_before,
            load_after,
            table,
            lines,
        )
        print(write_results("latency_verify", "Verify latency", body, module="latency"))
        return
    if args.large_only:
        load_before = os.getloadavg()[0]
        large = child("large")
        load_after = os.getloadavg()[0]
        table, lines = large_report(large)
        body = _stage_body(
            "\n".join(_doc_item(name) for name in ("Uploads", "Larger size")),
            load_before,
            load_after,
            table,
            lines,
        )
        print(write_results("latency_large", "Latency of a 60k upload", body, module="latency"))
        return
    if args.startup_only:
        load_before = os.getloadavg()[0]
        started = startup(args.startup_runs, args.startup_input_size, args.startup_core)
        other = args.startup_input_size is not None or args.startup_core is not None
        cold = None if other else cold_precompute()
        load_after = os.getloadavg()[0]
        table, lines = startup_report(started)
        if cold is not None:
            lines.append(precompute_line(cold))
        body = _stage_body(
            (
                "- **Start-up**" + __doc__.split("- **Start-up**", 1)[1].split("\n- **", 1)[0]
            ).strip(),
            load_before,
            load_after,
            table,
            lines,
        )
        name, title = "latency_startup", "Cold and warm start"
        if args.startup_input_size is not None:
            name += f"_{args.startup_input_size}"
            size = args.startup_input_size
            title += f" (what-if: backbone input {size}x{size})"
        if args.startup_core is not None:
            name += "_" + args.startup_core.resolve().name
            title += f" of the core in {args.startup_core.resolve()}"
        print(write_results(name, title, body, module="latency"))
        return
    load_before = os.getloadavg()[0]
    started = None if args.skip_cold else startup(args.startup_runs)
    print("startup", started, flush=True)
    cold = None if args.skip_cold else cold_precompute()
    print("cold", cold, flush=True)
    demo = child("demo")
    print("demo", {k: v for k, v in demo.items() if not isinstance(v, list)}, flush=True)
    large = None if args.skip_large else child("large")
    if large:
        print("large", {k: v for k, v in large.items() if not isinstance(v, list)}, flush=True)
    app = None if args.skip_app else app_memory(args.app.resolve())
    print("app", app, flush=True)
    verified = None if args.skip_verify else child("verify")
    load_after = os.getloadavg()[0]

    rows, lines = [], []
    for label, result in (
        ("demo (n = 1000, real explainer)", demo),
        ("n = 60,000 (see above)", large),
    ):
        if not result:
            continue
        if "error" in result:
            rows.append([label, f"failed: {result['error']}", "", "", ""])
            continue
        p50, p95 = percentiles(result["totals"])
        rows.append(
            [
                label,
                result["n_train"],
                f"{p50 * 1000:.0f}",
                f"{p95 * 1000:.0f}",
                len(result["totals"]),
            ]
        )
    if demo and "totals" in demo:
        p50, _ = percentiles(demo["totals"])
        lines.append(
            f"- Goal p50 < 300 ms at the demo size: {p50 * 1000:.0f} ms, "
            f"{'met' if p50 < 0.3 else 'missed'}. Of a demo upload, decoding takes "
            f"{statistics.median(demo['decodes']) * 1000:.1f} ms (median) and the EfficientNet-Lite0 "
            f"forward pass alone {demo['backbone_s'] * 1000:.0f} ms."
        )
        lines.append(
            f"- CPU time per demo upload (all threads, p50): "
            f"{statistics.median(demo['cpu']) * 1000:.0f} ms; wall time well above CPU time / 2 "
            "means the upload waited for cores other processes held."
        )
        lines.append(f"- Warm start (explainer from the cache): {demo['warm_start_s']:.1f} s.")
        lines.append(
            f"- Peak resident memory of the process holding the demo explainer and serving "
            f"{args.uploads + 3} uploads: {demo['peak_bytes'] / MIB:.0f} MiB."
        )
    startup_table = ""
    if started:
        startup_table, startup_lines = startup_report(started)
        lines += startup_lines
    if cold:
        lines.append(precompute_line(cold))
    large_table = ""
    if large:
        large_table, large_lines = large_report(large)
        lines += large_lines
    if app:
        if "peak_bytes" in app:
            server = app.get("server_rss_bytes")
            total = app["peak_bytes"] + (server or 0)
            lines.append(
                f"- Dashboard app `{app['app']}` run headless (AppTest): peak {app['peak_bytes'] / MIB:.0f}"
                f" MiB; idle `streamlit run` server {server / MIB if server else float('nan'):.0f} MiB;"
                f" together {total / MIB:.0f} MiB (goal < 2048 MiB: "
                f"{'met' if total < 2 * 1024 * MIB else 'missed'})"
                + (f"; exceptions: {app['exceptions']}" if app.get("exceptions") else "")
                + "."
            )
        else:
            lines.append(f"- Dashboard app memory: failed: {app.get('error')}.")
    verify_table = ""
    if verified:
        verify_table, verify_lines = verify_report(verified)
        lines += verify_lines
    body = (
        __doc__.split("\n\n", 2)[2].strip()
        + f"\n\nLoad average (1-minute) before {load_before:.2f}, after {load_after:.2f}.\n\n"
        + markdown_table(["problem", "n_train", "p50 ms", "p95 ms", "uploads timed"], rows)
        + "\n\n"
        + "\n".join(lines)
        + ("\n\nAn upload at n = 60k, stage by stage:\n\n" + large_table if large_table else "")
        + ("\n\nCold and warm start, stage by stage:\n\n" + startup_table if startup_table else "")
        + ("\n\nVerify, stage by stage:\n\n" + verify_table if verify_table else "")
        + "\n"
    )
    print(write_results("latency", "Interactive latency, start-up and memory", body))


if __name__ == "__main__":
    main()
