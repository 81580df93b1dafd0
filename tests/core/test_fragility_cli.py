"""``influence fragility`` end to end: JSON and human reports, the architectures option, a run
stopped and continued from its progress file, --partial and --report, and bad input."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from core.cli import main
from core.commands import fragility as command
from core.fragility import load_results, progress_path, run_fragility
from core.networks import Architecture


def _tiny_cli_options(tmp_path):
    return [
        "--n-train", "100", "--image-size", "7", "--depths", "1", "--base-width", "2",
        "--weight-decays", "0.01", "--epochs", "10", "--top-k", "5", "--seeds", "1",
        "--noise-seeds", "1", "--lissa-depth", "50", "--quiet",
        "--output", str(tmp_path / "out.json"),
    ]  # fmt: skip


@pytest.mark.slow
def test_cli_quick_json(tmp_path, capsys):
    threads = torch.get_num_threads()
    status = main(["fragility", "--quick", "--json", *_tiny_cli_options(tmp_path)])
    assert torch.get_num_threads() == threads  # restored after the run
    assert status == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["results_file"] == str(tmp_path / "out.json") and payload["complete"]
    assert len(payload["table"]["columns"]) == 2
    labels = [row["model"] for row in payload["table"]["rows"]]
    assert labels[0] == "Logistic regression (pixels)" and "CNN d1 w2 · exact" in labels
    assert {r["solver"] for r in payload["noise_floor"]} == {"exact", "CG", "LiSSA"}
    assert len(payload["study"]) == 6
    assert load_results(tmp_path / "out.json").config.n_train == 100
    assert not progress_path(tmp_path / "out.json").exists()  # removed once the grid is done


@pytest.mark.slow
def test_cli_human_report_and_markdown(tmp_path, capsys):
    options = _tiny_cli_options(tmp_path)
    status = main(["fragility", "--quick", "--solvers", "exact", "--no-convex", *options])
    assert status == 0
    out = capsys.readouterr().out
    assert "Pearson / Spearman" in out and "damping" in out and "CNN d1 w2 · exact" in out
    assert "The study's numbers next to ours" in out and "load average" in out
    status = main(["fragility", "--report", str(tmp_path / "out.json"), "--markdown"])
    assert status == 0
    markdown = capsys.readouterr().out
    assert "| model |" in markdown and "### The noise floor" in markdown
    assert "| small CNN (MNIST, 0.001) | 0.95 / 0.87 | CNN d2 w8 |" in markdown


def test_architectures_option_names_the_new_families():
    assert command.parse_architecture("lenet") == Architecture.lenet5()
    assert command.parse_architecture("resnet") == Architecture.resnet(8, 8)
    assert command.parse_architecture("resnet14-w4") == Architecture.resnet(14, 4)
    assert command.parse_architecture("cnn-d3-w16") == Architecture(3, 16)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown architecture"):
        command.parse_architecture("vgg13")
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["fragility", "--architectures", "lenet,resnet", "--widths", "8,50"])
    config = command.build_config(args)
    assert config.architectures == (
        Architecture(2, 8),
        Architecture(2, 50),
        Architecture.lenet5(),
        Architecture.resnet(8, 8),
    )


@pytest.mark.slow
def test_cli_continues_a_stopped_run_and_writes_a_partial_one(tmp_path, capsys, monkeypatch):
    options = [*_tiny_cli_options(tmp_path), "--solvers", "exact", "--no-convex"]
    options[options.index("--weight-decays") + 1] = "0.01,0"
    output = tmp_path / "out.json"
    real = run_fragility

    def stopped(config, progress=None, **kwargs):
        def stop(result, index, total):
            raise KeyboardInterrupt  # Ctrl-C (or a kill) after the first cell was written

        return real(config, progress, **{**kwargs, "on_cell": stop})

    monkeypatch.setattr(command, "run_fragility", stopped)
    assert main(["fragility", "--quick", *options]) == 130
    assert progress_path(output).exists() and not output.exists()
    # --partial writes what finished; the rest is marked.
    assert main(["fragility", "--quick", *options, "--partial", "--json"]) == 0
    partial = json.loads(capsys.readouterr().out)
    assert not partial["complete"] and partial["missing"] == [
        "CNN d1 w2 | no weight decay | repeat 0"
    ]
    # It names itself, not the run that wrote the progress file, as the command behind it.
    command_line = partial["results"]["command"]
    assert command_line.startswith("influence fragility --quick") and "--partial" in command_line
    # Another grid with the same output is refused with a message, and nothing is lost.
    monkeypatch.setattr(command, "run_fragility", real)
    bigger = [*options]
    bigger[bigger.index("--n-train") + 1] = "120"
    assert main(["fragility", "--quick", *bigger]) == 2
    assert "--restart" in capsys.readouterr().err and progress_path(output).exists()
    # The same command continues: one cell from the file, one run now; a log (not a terminal)
    # gets a line per stage and one per finished cell.
    assert main(["fragility", "--quick", *[o for o in options if o != "--quiet"]]) == 0
    err = capsys.readouterr().err
    assert "[1/2] CNN d1 w2, λ=0.01" in err and "[2/2] CNN d1 w2, λ=0" in err
    assert "[2/2] CNN d1 w2, no weight decay: training" in err
    assert load_results(output).complete and not progress_path(output).exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--solvers", "newton"], "solvers are"),
        (["--weight-decays", "a,b"], "numbers"),
        (["--depths", "x"], "integers"),
        (["--classes", "Shirt"], "at least two"),
        (["--architectures", "vgg13"], "unknown architecture"),
        (["--architectures", "lenet,resnet9"], "6k + 2"),
    ],
)
def test_cli_rejects_bad_options(options, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fragility", "--quick", *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--depths", "0"], "depth"),
        (["--weight-decays", "-1"], "weight_decays"),
        (["--classes", "Shirt,Nope"], "No class named"),
        (["--threads", "0"], "threads"),
        (["--partial"], "No fragility progress file"),
    ],
)
def test_cli_reports_bad_values_with_status_2(options, message, tmp_path, capsys):
    status = main(["fragility", "--quick", "--output", str(tmp_path / "x.json"), *options])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
