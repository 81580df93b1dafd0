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
        default=None,
        help="side length ImageFolder images are resized to (default 64, or with --network the "
        "network's input size; idx data keeps 28)",
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
    add_network_options(parser)


def add_network_options(parser: argparse.ArgumentParser) -> None:
    """--network and its weights and preprocessing: the third model, your network's last layer."""
    group = parser.add_argument_group(
        "your network",
        "Add a third model: your classification network's last layer, refitted on its "
        "penultimate features (lower layers frozen). Its outputs must be the dataset's classes "
        "in order (for an ImageFolder: sorted folder names).",
    )
    group.add_argument(
        "--network",
        default=None,
        metavar="ARCH|PATH.pt2",
        help="a torchvision architecture name (e.g. resnet18) with --network-weights, or a "
        "torch.export program saved as .pt2",
    )
    group.add_argument(
        "--network-weights",
        default=None,
        metavar="PATH",
        help="the architecture's state dict (torch.save(model.state_dict(), PATH)); read with "
        "torch.load(weights_only=True)",
    )
    group.add_argument(
        "--network-input-size",
        type=int,
        default=None,
        help="side of the square input (default: torchvision's metadata for the architecture, "
        "the program's input shape, or 224)",
    )
    group.add_argument(
        "--network-mean",
        default=None,
        metavar="R,G,B",
        help="normalisation mean of pixels in [0, 1] (default: torchvision's metadata, else "
        "ImageNet's 0.485,0.456,0.406)",
    )
    group.add_argument(
        "--network-std",
        default=None,
        metavar="R,G,B",
        help="normalisation std (default: torchvision's metadata, else 0.229,0.224,0.225)",
    )
    group.add_argument(
        "--network-l2",
        type=float,
        default=None,
        help="weight decay of the refitted last layer (default: chosen by cross-validation)",
    )


def network_spec(args: argparse.Namespace) -> Any:
    """The :class:`core.user_network.NetworkSpec` the options describe, or ``None``."""
    from core.errors import InfluenceExplorerError
    from core.user_network import NetworkSpec

    network = getattr(args, "network", None)
    if network is None:
        for option in ("weights", "input_size", "mean", "std", "l2"):
            if getattr(args, f"network_{option}", None) is not None:
                flag = "--network-" + option.replace("_", "-")
                raise InfluenceExplorerError(f"{flag} needs --network.")
        return None

    def triple(option: str) -> tuple[float, ...] | None:
        text = getattr(args, f"network_{option}")
        if text is None:
            return None
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) != 3:
            raise InfluenceExplorerError(
                f"--network-{option} takes three numbers, R,G,B (e.g. 0.485,0.456,0.406); got "
                f"{text!r}."
            )
        return values

    return NetworkSpec(
        network=network,
        weights=args.network_weights,
        input_size=args.network_input_size,
        mean=triple("mean"),  # type: ignore[arg-type]
        std=triple("std"),  # type: ignore[arg-type]
    )


def network_report(explainer: Any) -> dict[str, Any] | None:
    """What the user's network is and how its refitted last layer compares with its own head
    (for --json), or ``None`` without a network."""
    from core.user_network import WHAT_IS_EXPLAINED

    for key, summary in explainer.summaries().items():
        head = summary.original_head
        if head is None:
            continue
        info = head.network
        return {
            "model": key,
            "label": summary.label,
            "kind": info.kind,
            "architecture": info.architecture,
            "file": info.file,
            "sha256": info.sha256,
            "n_classes": info.n_classes,
            "feature_dim": info.feature_dim,
            "head": info.head,
            "preprocessing": {
                "input_size": list(info.preprocessing.input_size),
                "mean": list(info.preprocessing.mean),
                "std": list(info.preprocessing.std),
                "source": info.preprocessing.source,
                "description": info.preprocessing.describe(),
            },
            "refitted_head": {
                "agreement_with_your_head": head.agreement,
                "your_head_test_accuracy": head.original_accuracy,
                "refitted_test_accuracy": summary.test_accuracy,
                "your_head_predicts_other_classes": head.outside_chosen,
                "relative_parameter_change": head.parameter_change,
                "n_test": head.n_test,
                "l2": summary.hyperparameters.get("l2"),
            },
            "what_is_explained": WHAT_IS_EXPLAINED,
        }
    return None


def network_line(report: dict[str, Any]) -> str:
    """One line about the user's network for a human report or stderr."""
    head = report["refitted_head"]
    return (
        f"{report['label']}: {report['n_classes']} classes, {report['feature_dim']}-d features; "
        f"{report['preprocessing']['description']}. The refitted last layer agrees with your "
        f"network's own head on {head['agreement_with_your_head']:.1%} of {head['n_test']} test "
        f"images (your head's accuracy there {head['your_head_test_accuracy']:.1%}, the refit's "
        f"{head['refitted_test_accuracy']:.1%})."
    )


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

    spec = network_spec(args)
    image_size = args.image_size
    if spec is not None:
        from core.user_network import load_network

        # Loaded before the dataset: a wrong file fails in seconds, and the dataset's images
        # default to the network's input size (the load is cached for the explainer).
        preprocessing = load_network(spec).info.preprocessing
        if image_size is None:
            image_size = max(preprocessing.input_size)
    image_size = 64 if image_size is None else image_size
    dataset = open_dataset_from_args(args, image_size=image_size)
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
        network=spec,
        network_l2=args.network_l2,
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
    report = network_report(explainer)
    if report is not None and not args.quiet:
        print(f"influence {args.command}: {network_line(report)}", file=sys.stderr)
    return explainer


def open_dataset_from_args(args: argparse.Namespace, image_size: int | None = None) -> Any:
    """The dataset of --dataset, --image-size and --data-root.

    Args:
        args: parsed options.
        image_size: side length to use instead of --image-size (e.g. a network's input size
            when --image-size was not given); ``None`` takes --image-size, else 64.

    Raises:
        DatasetError: as :func:`core.data.open_dataset`; for links leading out of the dataset,
            the message also names the flag that allows them.
    """
    from core.data import open_dataset
    from core.errors import OutsideRootsError

    roots = getattr(args, "data_root", None)
    if image_size is None:
        image_size = 64 if args.image_size is None else args.image_size
    try:
        return open_dataset(args.dataset, image_size=(image_size, image_size), roots=roots or None)
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
