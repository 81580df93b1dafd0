"""The `influence` CLI on a tiny Fashion-MNIST-format dataset: reports, JSON and error exits."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.cli import build_parser, main
from core.commands.common import open_dataset_from_args
from core.data import load_demo
from tests.bounded import run_bounded
from tests.core.test_data import write_idx


@pytest.fixture(scope="module")
def tiny_idx(tmp_path_factory):
    """All ten classes (the loader needs them), 8 train and 3 test images each, from the demo."""
    demo = load_demo()
    root = tmp_path_factory.mktemp("fashion-tiny")
    for prefix, split, per_class in (("train", "train", 8), ("t10k", "test", 3)):
        labels = getattr(demo, f"{split}_labels")
        rows = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
        images = getattr(demo, f"{split}_images")[rows][..., 0]
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress=False)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels[rows], compress=True)
    return root


@pytest.fixture(scope="module")
def common(tiny_idx, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cli-cache")
    return ["--dataset", str(tiny_idx), "--cache-dir", str(cache), "--quiet"]


def run_json(capsys, args):
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_precompute_reports_both_models(capsys, common):
    payload = run_json(capsys, ["precompute", *common, "--json"])
    assert payload["classes"] == ["T-shirt/top", "Shirt"]
    assert payload["n_train"] == 16 and payload["n_test"] == 6
    assert set(payload["models"]) == {"svm", "logreg"}
    for model in payload["models"].values():
        assert 0 <= model["test_accuracy"] <= 1
    assert main(["precompute", *common]) == 0
    report = capsys.readouterr().out
    assert "RBF SVM on pixels" in report and "accuracy:" in report and "λ by 3-fold CV" in report


def test_explain_a_test_index_and_an_image_file(capsys, common, tmp_path):
    payload = run_json(capsys, ["explain", *common, "--test-index", "1", "--k", "3", "--json"])
    assert payload["true_label"] in ("T-shirt/top", "Shirt")
    for model in payload["models"].values():
        scores = [item["score"] for item in model["helpful"]]
        assert all(s > 0 for s in scores) and scores == sorted(scores, reverse=True)
        assert all(item["score"] < 0 for item in model["harmful"])
        assert model["explained_label"] == payload["true_label"]

    image = tmp_path / "upload.png"
    Image.fromarray(load_demo().test_images[0][..., 0]).save(image)
    payload = run_json(
        capsys, ["explain", *common, "--image", str(image), "--json", "--all-scores"]
    )
    for model in payload["models"].values():
        assert model["explained_label"] == model["predicted"]
        assert len(model["scores"]) == 16
        familiarity = model["familiarity"]
        assert familiarity["unusual"] == (familiarity["ratio"] > 1)
    unusual = [m["label"] for m in payload["models"].values() if m["familiarity"]["unusual"]]
    assert len(payload["warnings"]) == len(unusual)
    assert main(["explain", *common, "--test-index", "0"]) == 0
    assert "most helped" in capsys.readouterr().out


def test_verify_reports_both_estimates(capsys, common):
    payload = run_json(capsys, ["verify", *common, "--test-index", "2", "--k", "5", "--json"])
    (result,) = payload["results"]
    for model in result["models"].values():
        assert set(model["agreement"]) == {"corrected", "first_order"}
        assert len(model["actual"]) == 5 and model["converged"]
    payload = run_json(capsys, ["verify", *common, "--test-indices", "0,3", "--k", "4", "--json"])
    assert [r["test_index"] for r in payload["results"]] == [0, 3]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["precompute", "--dataset", "/no/such/dir"], "/no/such/dir"),
        (["explain", "--k", "3"], "--test-index"),
        (["precompute", "--classes", "Foo,Bar"], "Foo"),
        (["verify", "--test-index", "0", "--k", "1"], "--k"),
        (["explain", "--test-index", "999"], "test_index"),
    ],
)
def test_bad_input_exits_2_with_a_message(capsys, common, args, message):
    command, *rest = args
    if "--dataset" not in rest:
        rest = [*rest, *common]
    assert main([command, *rest]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err


def test_unreadable_image_exits_2(capsys, common, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["explain", *common, "--image", str(broken)]) == 2
    assert "broken.png" in capsys.readouterr().err


def test_python_dash_m_core_runs():
    out = subprocess.run(
        [sys.executable, "-m", "core", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("precompute", "explain", "verify"):
        assert command in out


def test_a_hessian_that_is_not_positive_definite_names_the_fix_and_the_fix_works(capsys, common):
    # Not simulated: with (almost) no weight decay, 1280 features and 16 training images, the
    # logistic regression's Hessian is singular to machine precision and Cholesky fails.
    singular = ["explain", *common, "--test-index", "0", "--k", "2", "--logreg-l2", "1e-30"]
    assert main(singular) == 2
    err = capsys.readouterr().err
    assert "not positive definite" in err
    match = re.search(r"Try --damping (\S+)\.\)", err)
    assert match, err
    payload = run_json(capsys, [*singular, "--damping", match.group(1), "--json"])
    assert payload["warnings"] == []
    for model in payload["models"].values():
        assert model["helpful"] or model["harmful"]


def test_lissa_that_cannot_have_converged_is_reported(capsys, common, monkeypatch):
    from core import influence

    # A short recursion keeps the test quick; the default depth warns here too, only slower.
    monkeypatch.setattr(influence, "SolverConfig", partial(influence.SolverConfig, lissa_depth=30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shown as a line of its own, not as a Python warning
        status = main(["explain", *common, "--test-index", "0", "--solver", "lissa", "--json"])
    assert status == 0
    out, err = capsys.readouterr()
    warned = json.loads(out)["warnings"]
    assert len(warned) == 2
    assert all("cannot have converged" in message for message in warned)
    assert err.count("influence explain: warning: ") == 2


def test_lissa_that_diverges_says_to_use_the_exact_solver(capsys, common, monkeypatch):
    from core import influence

    # An eigenvalue estimate made too small, so the recursion's scale is too: it diverges.
    real = influence.LiSSASolver._largest_eigenvalue
    monkeypatch.setattr(
        influence.LiSSASolver, "_largest_eigenvalue", lambda self: 0.05 * real(self)
    )
    monkeypatch.setattr(influence, "SolverConfig", partial(influence.SolverConfig, lissa_depth=60))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = main(["explain", *common, "--test-index", "0", "--solver", "lissa"])
    assert status == 2
    err = capsys.readouterr().err
    assert "LiSSA diverged" in err and "(Try --solver exact.)" in err


def test_image_that_is_a_named_pipe_exits_2_instead_of_hanging(common, tmp_path):
    # `influence explain --image x.png` on a FIFO used to wait forever for a writer.
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    run = run_bounded(
        f"""
        from core.cli import main
        status = main(["explain", *{common!r}, "--image", {str(fifo)!r}])
        report(status=status)
        """,
        timeout=240,
        address_space=64 * 2**30,  # torch maps far more address space than it uses
    )
    assert not run.timed_out, "explain --image blocked on the FIFO"
    assert run.result is not None and run.result["status"] == 2, run.output
    assert "x.png is a named pipe (FIFO), not a regular file" in run.output


def _folder_with_a_link_out(tmp_path) -> Path:
    png = io.BytesIO()
    Image.new("L", (8, 8), 50).save(png, "PNG")
    root = tmp_path / "pets"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            (root / split / name / "a.png").write_bytes(png.getvalue())
    elsewhere = tmp_path / "photos"
    elsewhere.mkdir()
    (elsewhere / "b.png").write_bytes(png.getvalue())
    (root / "train" / "cat" / "b.png").symlink_to(elsewhere / "b.png")
    return root


def test_links_out_of_the_dataset_name_the_flag_that_allows_them(capsys, tmp_path):
    root = _folder_with_a_link_out(tmp_path)
    assert main(["precompute", "--dataset", str(root), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "train/cat/b.png: symbolic link(s) leading outside the dataset directory" in err
    assert "--data-root" in err
    args = build_parser().parse_args(
        ["precompute", "--dataset", str(root), "--data-root", str(tmp_path), "--image-size", "8"]
    )
    dataset = open_dataset_from_args(args)
    assert "train/cat/b.png" in dataset.train_ids.tolist()
