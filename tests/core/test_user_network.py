"""Loading a user's network safely: state dicts, torch.export programs, and everything hostile."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from core import user_network
from core.cli import main
from core.errors import NetworkError
from core.user_network import (
    NetworkFeaturizer,
    NetworkSpec,
    NetworkUploads,
    check_symbolic_expression,
    head_initialisation,
    load_network,
)


# ------------------------------------------------------------------------------- fixtures
class Tiny(nn.Module):
    """conv -> relu -> global mean -> linear; optionally a softmax after the linear layer."""

    def __init__(self, softmax: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(torch.relu(self.conv(x)).mean((2, 3)))
        return out.softmax(1) if self.softmax else out


def export(model: nn.Module, path: Path, *, dynamic: bool = True, size: int = 16) -> Path:
    example = torch.randn(2 if dynamic else 1, 3, size, size)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model.eval(), (example,), dynamic_shapes=shapes), path)
    return path


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """One small network as a dynamic-batch and a static-batch torch.export program."""
    root = tmp_path_factory.mktemp("programs")
    model = Tiny().eval()
    return {
        "model": model,
        "dynamic": export(model, root / "tiny.pt2"),
        "static": export(model, root / "tiny_static.pt2", dynamic=False),
        "root": root,
    }


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    """torchvision's mobilenet_v3_small with 3 classes (random weights) and its state dict."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=3).eval()
    path = tmp_path_factory.mktemp("weights") / "mobilenet.pt"
    torch.save(model.state_dict(), path)
    return model, path


def images(n: int = 5, size: int = 20, channels: int = 3) -> np.ndarray:
    return (np.random.default_rng(0).random((n, size, size, channels)) * 255).astype(np.uint8)


def rewrite(source: Path, target: Path, edit, *, add: dict[str, bytes] | None = None) -> Path:
    """Copy a .pt2 archive, passing each entry (name without the archive folder, bytes) through
    ``edit``; ``add`` appends entries."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        prefix = archive.namelist()[0].split("/")[0]
        for info in archive.infolist():
            name = info.filename[len(prefix) + 1 :]
            out.writestr(info, edit(name, archive.read(info)))
        for name, data in (add or {}).items():
            out.writestr(f"{prefix}/{name}", data)
    return target


def edit_json(entry: str, change):
    def edit(name: str, data: bytes) -> bytes:
        if name != entry:
            return data
        document = json.loads(data)
        change(document)
        return json.dumps(document).encode()

    return edit


# ------------------------------------------------------------------------------- the spec
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"network": ""}, "torchvision architecture"),
        ({"network": "resnet18"}, "weights must name its state dict"),
        ({"network": "model.pt2", "weights": "w.pt"}, "holds its own weights"),
        ({"network": "weights.pt"}, "not a .pt2 program"),
        ({"network": "resnet18", "weights": "w.pt", "input_size": 4}, "input_size"),
        ({"network": "resnet18", "weights": "w.pt", "mean": (0.5, 0.5)}, "mean must be three"),
        ({"network": "resnet18", "weights": "w.pt", "std": (1, 0, 1)}, "std must be three"),
    ],
)
def test_spec_refuses_what_cannot_work(kwargs, message):
    with pytest.raises(NetworkError, match=message):
        NetworkSpec(**kwargs)


def test_head_initialisation_reproduces_the_heads_probabilities():
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(5, 7, generator=generator), torch.randn(5, generator=generator)
    features = torch.randn(11, 7, generator=generator, dtype=torch.float64)
    logits = features @ weight.double().T + bias.double()
    with_one = torch.cat([features, torch.ones(11, 1, dtype=torch.float64)], 1)
    # Binary: σ(wᵀφ + b) is the softmax over the two chosen logits.
    theta = head_initialisation(weight, bias, [3, 1])
    assert torch.allclose(
        torch.sigmoid(with_one @ theta), torch.softmax(logits[:, [3, 1]], 1)[:, 1], atol=1e-12
    )
    # Softmax: the layout θ[j·k + c] of core.models gives the chosen logits themselves.
    theta = head_initialisation(weight, bias, [4, 0, 2])
    assert torch.allclose(with_one @ theta.reshape(8, 3), logits[:, [4, 0, 2]], atol=1e-12)


# ------------------------------------------------------------------- torchvision + state dict
def test_state_dict_features_are_the_input_of_the_last_linear_layer(mobilenet):
    model, path = mobilenet
    featurizer = NetworkFeaturizer(NetworkSpec("mobilenet_v3_small", weights=str(path)))
    network = featurizer.load()
    info = network.info
    assert (info.n_classes, info.feature_dim, info.head) == (3, 1024, "module 'classifier.3'")
    assert info.preprocessing.input_size == (224, 224)
    assert "MobileNet_V3_Small_Weights" in info.preprocessing.source
    batch = images(3)
    x = featurizer.prepare(torch.tensor(batch, dtype=torch.float32))
    with torch.no_grad():
        expected = model.classifier[:3](torch.flatten(model.avgpool(model.features(x)), 1))
        logits = model(x)
    features = featurizer.transform(batch)
    assert np.allclose(features, expected.numpy(), atol=1e-5)
    assert np.allclose(network.logits(torch.as_tensor(features)), logits.double(), atol=1e-4)
    # Grey images are replicated to RGB; the whole image is resized (no crop).
    grey = images(2, channels=1)
    assert np.allclose(
        featurizer.transform(grey), featurizer.transform(np.repeat(grey, 3, axis=3)), atol=1e-6
    )


def test_options_override_the_metadata_and_say_so(mobilenet):
    _, path = mobilenet
    spec = NetworkSpec("mobilenet_v3_small", weights=str(path), input_size=64, mean=(0.5,) * 3)
    preprocessing = load_network(spec).info.preprocessing
    assert preprocessing.input_size == (64, 64) and preprocessing.mean == (0.5, 0.5, 0.5)
    assert preprocessing.std == pytest.approx((0.229, 0.224, 0.225))
    assert "input size, mean from options" in preprocessing.source


def test_wrapped_and_data_parallel_state_dicts_load(mobilenet, tmp_path):
    model, _ = mobilenet
    path = tmp_path / "checkpoint.pt"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, path)
    network = load_network(NetworkSpec("mobilenet_v3_small", weights=str(path)))
    assert torch.equal(network.head_weight, model.classifier[3].weight.double())


class Marker:
    """Unpickling this creates a file: proof that code from a file ran."""

    path = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickled_objects_never_run(tmp_path):
    marker = tmp_path / "ran"
    Marker.path = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(3, 4), "payload": Marker()}, path)
    with pytest.raises(NetworkError, match="Python objects other than tensors"):
        load_network(NetworkSpec("resnet18", weights=str(path)))
    with open(path, "wb") as handle:
        pickle.dump(Marker(), handle)
    with pytest.raises(NetworkError):
        load_network(NetworkSpec("resnet18", weights=str(path)))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("model", "Python objects other than tensors"),
        ("tensor", "holds a Tensor, not a state dict"),
        ("numbers", "non-tensor entries"),
        ("empty dict", "empty state dict"),
        ("random", "not a PyTorch state dict"),
        ("empty file", "is empty"),
        ("other architecture", "missing keys features.0.0.weight"),
        ("reshaped", "shape mismatches"),
    ],
)
def test_files_that_are_not_this_architectures_state_dict(mobilenet, tmp_path, content, message):
    model, _ = mobilenet
    path = tmp_path / "weights.pt"
    state = model.state_dict()
    if content == "model":
        torch.save(model, path)
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "numbers":
        torch.save({"lr": 0.1, "epochs": 3}, path)
    elif content == "empty dict":
        torch.save({}, path)
    elif content == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif content == "empty file":
        path.write_bytes(b"")
    elif content == "other architecture":
        torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    else:
        state = dict(state)
        state["features.0.0.weight"] = state["features.0.0.weight"][:, :1]
        torch.save(state, path)
    with pytest.raises(NetworkError, match=message) as error:
        load_network(NetworkSpec("mobilenet_v3_small", weights=str(path)))
    assert "\n" not in str(error.value)


def test_unknown_architecture_suggests_names(tmp_path):
    with pytest.raises(NetworkError, match=r"unknown architecture 'resnet19'.*resnet18"):
        load_network(NetworkSpec("resnet19", weights=str(tmp_path / "w.pt")))


def test_a_network_without_a_final_linear_layer(tmp_path):
    path = tmp_path / "squeeze.pt"
    torch.save(torchvision.models.squeezenet1_1(num_classes=3).state_dict(), path)
    with pytest.raises(NetworkError, match="no final linear layer"):
        load_network(NetworkSpec("squeezenet1_1", weights=str(path)))


def test_paths_that_are_not_regular_files_are_refused_without_blocking(tmp_path, monkeypatch):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    with pytest.raises(NetworkError, match="not a regular file"):
        load_network(NetworkSpec("resnet18", weights=str(fifo)))
    with pytest.raises(NetworkError, match="is a directory"):
        load_network(NetworkSpec("resnet18", weights=str(tmp_path)))
    with pytest.raises(NetworkError, match="does not exist"):
        load_network(NetworkSpec("resnet18", weights=str(tmp_path / "missing.pt")))
    big = tmp_path / "big.pt"
    big.write_bytes(b"0" * 2048)
    monkeypatch.setattr(user_network, "MAX_WEIGHTS_BYTES", 1024)
    with pytest.raises(NetworkError, match="larger than the"):
        load_network(NetworkSpec("resnet18", weights=str(big)))


# ------------------------------------------------------------------------- torch.export


@pytest.mark.slow
def test_exported_program_features_and_head(programs):
    model = programs["model"]
    network = load_network(NetworkSpec(str(programs["dynamic"])))
    info = network.info
    assert (info.kind, info.n_classes, info.feature_dim, info.batch_size) == (
        "torch.export",
        3,
        4,
        None,
    )
    assert info.preprocessing.input_size == (16, 16)  # the program's own input shape
    assert torch.equal(network.head_weight, model.fc.weight.double())
    featurizer = NetworkFeaturizer(NetworkSpec(str(programs["dynamic"])))
    batch = images(5)
    x = featurizer.prepare(torch.tensor(batch, dtype=torch.float32))
    with torch.no_grad():
        expected = torch.relu(model.conv(x)).mean((2, 3))
    assert np.allclose(featurizer.transform(batch, batch_size=2), expected.numpy(), atol=1e-6)
    # A program exported for one image at a time runs in padded batches of one.
    static = NetworkFeaturizer(NetworkSpec(str(programs["static"])))
    assert static.load().info.batch_size == 1
    assert np.allclose(static.transform(batch, batch_size=3), expected.numpy(), atol=1e-6)
    # The feature map is differentiable to the pixels (heatmaps, attacks): a finite difference.
    gradient = featurizer.pixel_gradient(batch[:1], np.ones((1, 4)))
    bumped = batch[:1].copy()
    bumped[0, 3, 4, 1] += 20
    change = featurizer.transform(bumped).sum() - featurizer.transform(batch[:1]).sum()
    assert change == pytest.approx(20 * gradient[0, 3, 4, 1], rel=0.05, abs=1e-4)
    with pytest.raises(NetworkError, match="exported for 16x16 inputs"):
        load_network(NetworkSpec(str(programs["dynamic"]), input_size=32))


@pytest.mark.slow
def test_exported_programs_that_do_not_end_in_a_linear_layer(programs, tmp_path):
    with pytest.raises(NetworkError, match="not by a final linear layer"):
        load_network(NetworkSpec(str(export(Tiny(softmax=True), tmp_path / "softmax.pt2"))))


@pytest.mark.slow
def test_exported_program_in_training_mode(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 2),
    ).train()  # fmt: skip
    program = torch.export.export(
        model, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, tmp_path / "train.pt2")
    with pytest.raises(NetworkError, match="training mode"):
        load_network(NetworkSpec(str(tmp_path / "train.pt2")))


def _payload(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


class SampleInputs:
    path = ""

    def __reduce__(self):
        return (eval, (f"__import__('pathlib').Path({self.path!r}).touch() or ((), {{}})",))


def hostile(kind: str, source: Path, target: Path, marker: Path) -> Path:
    """A .pt2 built from a real export, changed to do something torch.export would let run."""
    graph = "models/model.json"
    if kind == "sympy expression":

        def change(document):
            graph_ = document["graph_module"]["graph"]
            name = graph_["inputs"][-1]["as_tensor"]["name"]
            size = {"as_expr": {"expr_str": _payload(marker), "hint": {"as_int": 2}}}
            graph_["tensor_values"][name]["sizes"][0] = size

        return rewrite(source, target, edit_json(graph, change))
    if kind == "pickled sample inputs":
        SampleInputs.path = str(marker)
        buffer = io.BytesIO()
        torch.save(SampleInputs(), buffer)

        def edit(name, data):
            return buffer.getvalue() if name == "data/sample_inputs/model.pt" else data

        return rewrite(source, target, edit)
    if kind == "guard code":
        return rewrite(
            source,
            target,
            edit_json(
                graph, lambda d: d.__setitem__("guards_code", [f"{_payload(marker)} is None"])
            ),
        )
    if kind == "pickled weights":

        def change(document):
            next(iter(document["config"].values()))["use_pickle"] = True

        return rewrite(source, target, edit_json("data/weights/model_weights_config.json", change))
    if kind == "compiled code":
        return rewrite(source, target, lambda n, d: d, add={"data/aotinductor/model/x.so": b"\0"})
    if kind == "enum in a spec":

        def change(document):
            call_graph = document["graph_module"]["module_call_graph"][0]["signature"]
            call_graph["in_spec"] = json.dumps(
                [1, {"type": None, "context": json.dumps({"__enum__": True, "fqn": "os:sep"}),
                     "children_spec": []}]
            )  # fmt: skip

        return rewrite(source, target, edit_json(graph, change))
    if kind == "code in a parameter name":

        def change(document):
            spec = document["graph_module"]["signature"]["input_specs"][0]["parameter"]
            spec["parameter_name"] = 'conv"),exec(' + repr(_payload(marker)) + '),("'

        return rewrite(source, target, edit_json(graph, change))
    if kind == "higher-order operator":

        def change(document):
            document["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.higher_order.cond"

        return rewrite(source, target, edit_json(graph, change))
    if kind == "compressed":
        with (
            zipfile.ZipFile(source) as archive,
            zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out,
        ):
            for info in archive.infolist():
                out.writestr(info.filename, archive.read(info))
        return target
    if kind == "not a zip":
        target.write_bytes(b"\x80\x02}q\x00." * 10)
        return target
    if kind == "truncated":
        target.write_bytes(source.read_bytes()[:3000])
        return target
    raise AssertionError(kind)


HOSTILE = {
    "sympy expression": "symbolic size",
    "pickled sample inputs": "sample inputs that are not plain tensors",
    "guard code": "guard code",
    "pickled weights": "as a pickle",
    "compiled code": "data/aotinductor",
    "enum in a spec": "enum",
    "code in a parameter name": "not a dotted path",
    "higher-order operator": "not an ATen operator",
    "compressed": "compressed entries",
    "not a zip": "not a torch.export program",
    "truncated": "zip",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_programs_are_refused_and_run_nothing(programs, tmp_path, kind):
    marker = tmp_path / "ran"
    path = hostile(kind, programs["dynamic"], tmp_path / "evil.pt2", marker)
    with pytest.raises(NetworkError, match=HOSTILE[kind]) as error:
        network = load_network(NetworkSpec(str(path)))
        network.penultimate(torch.zeros(1, 3, 16, 16))  # had it loaded, run it too
    assert "\n" not in str(error.value)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sympy expression", "pickled sample inputs", "guard code"])
def test_torch_export_load_itself_runs_code_from_the_file(programs, tmp_path, kind):
    """The finding the module docstring states: these files make torch.export.load (or the
    module it returns) run their code, which is why every .pt2 is checked first. If this test
    fails, a torch release closed the hole: update the docstring, keep the checks."""
    marker = tmp_path / "ran"
    path = hostile(kind, programs["dynamic"], tmp_path / "evil.pt2", marker)
    try:
        program = torch.export.load(path)
        program.module()(torch.zeros(2, 3, 16, 16))
    except Exception:
        pass  # the payload ran before whatever failed
    assert marker.exists()


@pytest.mark.parametrize(
    "text",
    [
        "s77",
        "Symbol('s77', positive=True, integer=True)",
        "Mul(Integer(2), Symbol('s3', integer=True))",
        "FloorDiv(Symbol('s0', positive=True), Integer(2)) + 1",
    ],
)
def test_symbolic_sizes_torch_writes_are_accepted(text):
    check_symbolic_expression(text, "x")


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('true')",
        "Symbol('s0').func",
        "Symbol('a; b')",
        "Integer(9)**Integer(99999)",
        "Pow(Integer(9), Integer(99999))",
        "Integer(99999)!",
        "s0[0]",
        "lambda: 0",
        "x=1",
        "s0 " * 300,
    ],
)
def test_symbolic_sizes_that_python_would_run_are_refused(text):
    with pytest.raises(NetworkError):
        check_symbolic_expression(text, "x")


# ------------------------------------------------------------------- the command line
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--network", "resnet19", "--network-weights", "w.pt"], "unknown architecture"),
        (["--network", "resnet18"], "weights must name its state dict"),
        (["--network-weights", "w.pt"], "--network-weights needs --network"),
        (["--network", "x.pt2", "--network-weights", "w.pt"], "holds its own weights"),
        (["--network", "resnet18", "--network-weights", "w.pt", "--network-mean", "1,2"], "R,G,B"),
    ],
)
def test_cli_option_errors_are_one_line_with_status_2(capsys, options, message):
    assert main(["explain", "--test-index", "0", "--quiet", *options]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("influence explain:")


def test_cli_class_count_must_match_the_dataset(run_cli, capsys, mobilenet):
    _, path = mobilenet
    status, _, err = run_cli(
        "precompute",
        "--network", "mobilenet_v3_small", "--network-weights", str(path),
        "--network-input-size", "32",
        capsys=capsys,
    )  # fmt: skip
    assert status == 2
    assert "has 3 outputs but the dataset has 10 classes" in err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------- uploads
def test_uploaded_networks_are_checked_before_they_are_kept(mobilenet, tmp_path):
    from core.store import ArtifactStore

    _, path = mobilenet
    uploads = NetworkUploads(ArtifactStore(tmp_path / "store"))
    with pytest.raises(NetworkError, match="does not fit"):
        uploads.add(path.read_bytes(), filename="mine.pt", architecture="resnet18", input_size=32)
    with pytest.raises(NetworkError, match="say which torchvision architecture"):
        uploads.add(path.read_bytes(), filename="mine.pt")
    assert uploads.list() == []
    assert not any(p.is_file() for p in (tmp_path / "store").rglob("*"))
    stored = uploads.add(path.read_bytes(), filename="mine.pt", architecture="mobilenet_v3_small")
    assert uploads.list() == [stored.content_hash]
    assert stored.info.n_classes == 3 and stored.spec.network == "mobilenet_v3_small"
    assert Path(str(stored.spec.weights)).read_bytes() == path.read_bytes()
    assert uploads.get(stored.content_hash).spec == stored.spec
    assert uploads.delete(stored.content_hash) and uploads.list() == []
    assert not uploads.delete(stored.content_hash)


def test_docs_quote_what_the_scores_explain():
    """docs/architecture.md gives the Method and Trust pages the same text the CLI prints."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    quoted = " ".join(line[2:].strip() for line in text.splitlines() if line.startswith("> "))
    assert user_network.WHAT_IS_EXPLAINED in quoted.replace("**", "")
