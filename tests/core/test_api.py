"""The public face: `core.__all__`, cheap `import core`, and the README's five-line example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

import core

README = Path(__file__).resolve().parents[2] / "README.md"


def test_all_names_resolve():
    for name in core.__all__:
        assert getattr(core, name) is not None, name
    for name in ("InfluenceEngine", "SolverConfig", "top_k", "verify", "Explainer", "groups"):
        assert name in core.__all__


def test_import_core_does_not_load_torch():
    # The command line's --help and argument errors must stay fast.
    code = "import sys, core; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_five_line_example_runs(make_logreg_problem, capsys):
    code = _readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    problem = make_logreg_problem(120, 10, seed=3)
    namespace = {"X": problem.X, "y": problem.y, "X_test": problem.X_test, "y_test": problem.y_test}
    exec(compile(code, str(README), "exec"), namespace)
    scores = namespace["scores"]
    assert scores.shape == (120,) and np.isfinite(scores).all()
    printed = capsys.readouterr().out
    assert "corrected" in printed and "spearman" in printed
    check = namespace["verify"](namespace["engine"], problem.X_test[:1], problem.y_test[:1], k=20)
    assert check[0].agreement["corrected"].spearman > 0.95
