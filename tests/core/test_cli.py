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
    assert payload["models"]["svm"]["lambda_curve"] is None
    curve = payload["models"]["logreg"]["lambda_curve"]
    assert curve["chosen"] == payload["models"]["logreg"]["hyperparameters"]["l2"]
    assert len(curve["mean"]) == len(curve["stderr"]) == len(curve["grid"]) == 4
    assert curve["criterion"] == "log_loss" and "one standard error" in curve["rule"]
    assert main(["precompute", *common]) == 0
    report = capsys.readouterr().out
    assert "RBF SVM on pixels" in report and "accuracy:" in report
    assert "λ chosen by:" in report and "<- chosen" in report


def test_precompute_every_class(capsys, common):
    # CG keeps the ten-class logistic regression's 12,800-parameter Hessian implicit (this tiny
    # set has 80 images, far fewer than the parameters), and a fixed λ skips cross-validation.
    every = ["--classes", "all", "--solver", "cg", "--logreg-l2", "0.1", "--json"]
    payload = run_json(capsys, ["precompute", *common, *every])
    assert payload["classes"] == list(load_demo().class_names)
    assert payload["n_train"] == 80 and payload["n_test"] == 30
    for model in payload["models"].values():
        assert 0 <= model["test_accuracy"] <= 1 and model["gradient_norm"] <= 1e-8
    svm = payload["models"]["svm"]
    assert "median rule" in svm["features"] and svm["hyperparameters"]["temperature"] == 0.1
    paper = run_json(
        capsys,
        ["precompute", *common, "--classes", "0,2,6", "--svm-gamma", "paper", "--json"],
    )
    assert paper["classes"] == ["T-shirt/top", "Pullover", "Shirt"]
    assert paper["models"]["svm"]["hyperparameters"]["gamma"] == pytest.approx(0.05 / 24)


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
    report = capsys.readouterr().out
    assert "most helped" in report and "exact in the margin" in report


@pytest.mark.parametrize("estimate", ["margin", "corrected", "first_order"])
def test_explain_offers_every_estimate_labelled(capsys, common, estimate):
    payload = run_json(
        capsys,
        ["explain", *common, "--test-index", "1", "--estimate", estimate, "--json", "--all-scores"],
    )
    for model in payload["models"].values():
        assert model["estimate"] == estimate and model["estimate_label"]
        assert len(model["scores"]) == 16


def test_verify_reports_every_estimate(capsys, common):
    payload = run_json(capsys, ["verify", *common, "--test-index", "2", "--k", "5", "--json"])
    (result,) = payload["results"]
    for model in result["models"].values():
        assert set(model["agreement"]) == {"margin", "corrected", "first_order"}
        assert set(model["estimate_labels"]) == set(model["agreement"])
        assert model["selected_by"] == "margin"
        for a in model["agreement"].values():
            assert {"slope", "affine_slope", "intercept", "pearson", "spearman"} <= set(a)
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
        (["precompute", "--classes", "Shirt"], "at least two classes"),
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
    # Nothing about the solver is left to warn about; with no weight decay the separable training
    # set is fitted to a near-zero loss, which is said (scores negligible), not an error.
    assert all("all but certain here" in w for w in payload["warnings"]), payload["warnings"]
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


def test_svm_gamma_takes_a_rule_or_a_positive_number(capsys, common):
    with pytest.raises(SystemExit) as exit_info:
        main(["precompute", *common, "--svm-gamma", "widest"])
    assert exit_info.value.code == 2
    assert "median" in capsys.readouterr().err


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
