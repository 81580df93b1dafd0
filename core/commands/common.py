"""Options, progress and output shared by the CLI subcommands."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from core.errors import InfluenceExplorerError


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """--json and --quiet."""
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout instead of a report"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars on stderr")


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    """--dataset, --classes, --image-size."""
    parser.add_argument(
        "--dataset",
        default="demo",
        help=(
            "'demo' (bundled Fashion-MNIST subset, default), 'fashion-mnist' (the Debian package's "
            "full idx files), a directory of idx files, or an ImageFolder directory with "
            "train/<class>/ and test/<class>/"
        ),
    )
    parser.add_argument(
        "--classes",
        default=None,
        help="two or more class names or indices separated by commas, e.g. 'T-shirt/top,Shirt' "
        "or '0,2,6', or 'all' for every class (default: the dataset's default pair)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=64,
        help="side length ImageFolder images are resized to (default 64; idx data keeps 28)",
    )
    parser.add_argument(
        "--data-root",
        action="append",
        type=Path,
        default=None,
        metavar="DIR",
        help="read dataset files only from inside DIR (repeatable), as the dashboard does with "
        "$INFLUENCE_DATA_ROOTS: the dataset must lie in one, and symbolic links in it may lead "
        "anywhere inside them (default: links must stay inside the dataset directory itself)",
    )


def add_cache_option(parser: argparse.ArgumentParser) -> None:
    """--cache-dir."""
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="artifact cache directory (default: $INFLUENCE_CACHE_DIR or ~/.cache/influence-explorer)",
    )


class ProgressBar:
    """A one-line progress bar on stderr, used as a ``progress(done, total)`` callback."""

    def __init__(self, label: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self._last = 0.0
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < self._done:  # the same stage started again (e.g. for the next model)
            self.start = now
        self._done = done
        # Redrawing a line only works on a terminal; a log file gets the final line only.
        interactive = getattr(self.stream, "isatty", lambda: False)()
        if done < total and (not interactive or now - self._last < 0.1):
            return
        self._last = now
        width = 30
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "-" * (width - filled)
        end = "\n" if done >= total else ""
        start = "\r" if interactive else ""
        self.stream.write(
            f"{start}{self.label:<28} [{bar}] {done}/{total} {now - self.start:6.1f}s{end}"
        )
        self.stream.flush()


def to_jsonable(value: Any) -> Any:
    """Numbers, arrays and dataclasses as plain JSON values (NaN and infinities become null)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def emit(payload: Any, args: argparse.Namespace, human: Callable[[Any], str]) -> None:
    """Print ``payload`` as JSON (``--json``) or as the report ``human(payload)`` builds."""
    if getattr(args, "json", False):
        json.dump(to_jsonable(payload), sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(human(payload).rstrip("\n") + "\n")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Backbone, hyperparameters and the inverse-Hessian solver of the two models."""
    from core.explainer import DEFAULT_SVM_TEMPERATURE
    from core.features import DEFAULT_BACKBONE
    from core.models import DEFAULT_GAMMA

    group = parser.add_argument_group("models")
    group.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        help="ImageNet backbone for the logistic regression: 'efficientnet-lite0' (offline "
        "default) or 'inception-v3' (the paper's; needs its weights)",
    )
    group.add_argument(
        "--inception-weights",
        default=None,
        help="path to Inception v3 ImageNet weights (torchvision's inception_v3_google-*.pth)",
    )
    group.add_argument(
        "--logreg-l2",
        type=float,
        default=None,
        help="weight decay of the logistic regression (default: chosen by cross-validation)",
    )
    group.add_argument("--svm-l2", type=float, default=1e-3, help="weight decay of the SVM")
    group.add_argument(
        "--svm-gamma",
        type=_gamma,
        default=DEFAULT_GAMMA,
        help="RBF γ: a number, 'median' (default: 1 / the median squared distance between "
        "training images, informative at every n) or 'paper' (Koh & Liang's 0.05/n_train)",
    )
    group.add_argument(
        "--svm-temperature",
        type=float,
        default=DEFAULT_SVM_TEMPERATURE,
        help=f"smooth-hinge temperature t (default {DEFAULT_SVM_TEMPERATURE:g})",
    )
    group.add_argument(
        "--max-train-per-class",
        type=int,
        default=None,
        help="subsample large training sets to this many images per class",
    )
    group.add_argument(
        "--solver", default="exact", choices=("exact", "cg", "lissa"), help="inverse-HVP solver"
    )
    group.add_argument("--damping", type=float, default=0.0, help="added to the Hessian's diagonal")


def _gamma(text: str) -> float | str:
    """--svm-gamma: a rule name or a positive number (argparse reports anything else)."""
    from core.models import GAMMA_RULES

    if text in GAMMA_RULES:
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or one of {', '.join(GAMMA_RULES)}, got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def add_estimate_option(
    parser: argparse.ArgumentParser, what: str, default: str | None = None
) -> None:
    """--estimate, offering every estimate of :data:`core.influence.ESTIMATES`.

    Args:
        what: what the estimate is used for, e.g. "influence estimate".
        default: the option's default (default: the engine's default estimate).
    """
    from core.influence import ESTIMATES
    from core.labels import ESTIMATE_DESCRIPTIONS

    default = ESTIMATES[0] if default is None else default
    described = "; ".join(f"{e}: {ESTIMATE_DESCRIPTIONS[e]}" for e in ESTIMATES)
    parser.add_argument(
        "--estimate",
        choices=ESTIMATES,
        default=default,
        help=f"{what} — {described} (default: {default})",
    )


def parse_classes(text: str | None) -> tuple[int | str, ...] | None:
    """'T-shirt/top,Shirt' or '0,6' -> a tuple of names or indices; 'all' -> ('all',)."""
    if text is None:
        return None
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if parts == ("all",):
        return parts
    return tuple(int(p) if p.isdigit() else p for p in parts)


class StageBars:
    """``progress(stage, done, total)`` shown as one progress bar per stage on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bars: dict[str, ProgressBar] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self._bars:
            self._bars[stage] = ProgressBar(stage[:28], enabled=self.enabled)
        self._bars[stage](done, total)


def build_explainer(args: argparse.Namespace) -> Any:
    """Dataset + config from the parsed options -> a ready :class:`core.explainer.Explainer`."""
    from core.commands.lists import model_keys
    from core.explainer import Explainer, ExplainerConfig
    from core.influence import LiSSAWarning, SolverConfig
    from core.store import ArtifactStore

    dataset = open_dataset_from_args(args)
    config = ExplainerConfig(
        classes=parse_classes(args.classes),
        backbone=args.backbone,
        inception_weights=args.inception_weights,
        logreg_l2=args.logreg_l2,
        svm_l2=args.svm_l2,
        svm_gamma=args.svm_gamma,
        svm_temperature=args.svm_temperature,
        solver=SolverConfig(method=args.solver, damping=args.damping),
        max_train_per_class=args.max_train_per_class,
    )
    cluster = connect_cluster(args)
    with warnings.catch_warnings():
        # Reported once below, as a plain line naming the model, not as a Python warning.
        warnings.simplefilter("ignore", LiSSAWarning)
        explainer = Explainer(dataset, config, store=ArtifactStore(args.cache_dir), cluster=cluster)
        if getattr(args, "model", None) is not None:
            # Refuse an unknown --model before the expensive part.
            model_keys(args.model, explainer.model_keys)
        explainer.prepare(StageBars(enabled=not args.quiet))
    for message in explainer.warnings:
        print(f"influence {args.command}: warning: {message}", file=sys.stderr)
    return explainer


def open_dataset_from_args(args: argparse.Namespace) -> Any:
    """The dataset of --dataset, --image-size and --data-root.

    Raises:
        DatasetError: as :func:`core.data.open_dataset`; for links leading out of the dataset,
            the message also names the flag that allows them.
    """
    from core.data import open_dataset
    from core.errors import OutsideRootsError

    roots = getattr(args, "data_root", None)
    try:
        return open_dataset(
            args.dataset, image_size=(args.image_size, args.image_size), roots=roots or None
        )
    except OutsideRootsError as error:
        if roots:
            raise
        raise OutsideRootsError(
            f"{error} If the links are yours, pass --data-root DIR with a directory that holds "
            "both the dataset and what they point to."
        ) from None


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Dataset, models, cache, cluster and output options (what every explainer-based command
    takes)."""
    add_dataset_options(parser)
    add_model_options(parser)
    add_cache_option(parser)
    add_cluster_option(parser)
    add_output_options(parser)


#: Commands whose work runs on a cluster when one is configured; the others run in-process.
CLUSTER_COMMANDS: tuple[str, ...] = ("precompute", "explain", "verify")


def add_cluster_option(parser: argparse.ArgumentParser) -> None:
    """--cluster."""
    parser.add_argument(
        "--cluster",
        default=None,
        metavar="SPEC",
        help="run on a Dask cluster: 'local:N' (N worker processes here), 'tcp://HOST:PORT' or "
        "'tls://HOST:PORT' (a running scheduler). Default: $INFLUENCE_CLUSTER; unset runs "
        f"in-process. Used by {', '.join(CLUSTER_COMMANDS)}.",
    )


def connect_cluster(args: argparse.Namespace) -> Any:
    """The cluster ``--cluster`` or ``$INFLUENCE_CLUSTER`` asks for, connected (closed at exit),
    or None to run in-process. Dask is imported only when one is asked for."""
    from core.backend import ENV_CLUSTER, cluster_spec

    option = getattr(args, "cluster", None)
    spec = cluster_spec(option)
    if spec is None:
        return None
    if args.command not in CLUSTER_COMMANDS:
        if option:
            raise InfluenceExplorerError(
                f"--cluster works with {', '.join(CLUSTER_COMMANDS)}; `influence {args.command}` "
                "runs in-process."
            )
        print(
            f"influence {args.command}: note: {ENV_CLUSTER} is set, but this command runs "
            "in-process.",
            file=sys.stderr,
        )
        return None
    from core.backend.cluster import connect

    cluster = connect(spec)
    atexit.register(cluster.close)
    if not getattr(args, "quiet", False):
        print(f"influence {args.command}: on {cluster.info().summary()}", file=sys.stderr)
    return cluster
