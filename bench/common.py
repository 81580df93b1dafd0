"""Shared helpers of the benchmarks: machine description and Markdown results."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_description() -> str:
    """CPU, cores, memory, load, Python and torch versions, as one Markdown line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f"{pages / 2**30:.0f} GiB"
    except (ValueError, OSError):
        memory = "unknown memory"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory}; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); load average {load}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(name: str, title: str, body: str, module: str | None = None) -> Path:
    """Write ``bench/results/<name>.md`` with a header naming the command, machine and date.

    ``module`` is the script (``bench.<module>``) when it differs from ``name``, e.g. scale's
    variants ``scale_gamma5e-05``.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    script = module or name
    command = "python -m bench." + script + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    header = (
        f"# {title}\n\n"
        f"- Command: `{command}`\n"
        f"- Machine: {machine_description()}\n"
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, revision {git_revision()}\n\n"
    )
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(header + body.rstrip() + "\n")
    update_summary()
    return path


#: Sections of bench/RESULTS.md, in order (a results file that does not exist yet is skipped).
#: ``analysis`` is the one hand-written file: what the measurements mean and which goals they miss.
SUMMARY_ORDER = ("analysis", "peers", "scale", "latency", "svm_settings", "verify_demo", "features")


def update_summary() -> Path:
    """Rebuild ``bench/RESULTS.md`` from the latest ``bench/results/*.md`` of every benchmark."""
    names = [n for n in SUMMARY_ORDER if (RESULTS_DIR / f"{n}.md").exists()]
    names += sorted(p.stem for p in RESULTS_DIR.glob("*.md") if p.stem not in SUMMARY_ORDER)
    parts = [
        "# Benchmark results\n\n"
        "The latest output of each `python -m bench.<name>` (regenerated whenever one of them "
        "writes `bench/results/<name>.md`). Timings were taken on a machine shared with other "
        "work: each section records the load average; compare ratios within a section rather "
        "than absolute times across sections.\n"
    ]
    for name in names:
        text = (RESULTS_DIR / f"{name}.md").read_text()
        # One level down, and image links relative to bench/ instead of bench/results/.
        text = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
        text = text.replace("](scale_", "](results/scale_")
        parts.append(text)
    path = RESULTS_DIR.parent / "RESULTS.md"
    path.write_text("\n\n".join(parts).rstrip() + "\n")
    return path


def worker_env() -> dict[str, str]:
    """The environment of a benchmark's child process: passive OpenMP waits, no progress bars,
    this repository importable."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["TQDM_DISABLE"] = "1"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_child(
    module_args: list[str], timeout: float
) -> tuple[subprocess.CompletedProcess | None, str | None]:
    """``python -m <module_args>`` in a child process with :func:`worker_env`, its output kept.

    Returns (the finished process, None), or what went wrong: (None, "timed out after N s"), or
    (the process, the last line of its stderr, or "exit N") when it exited with an error.
    """
    command = [sys.executable, "-m", *module_args]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=worker_env()
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return done, lines[-1][:200] if lines else f"exit {done.returncode}"
    return done, None


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- memory
# Linux keeps the peak resident set (VmHWM) per process; writing "5" to clear_refs resets it
# (Linux >= 4.0), so one process can measure the peak of each stage separately.


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def current_rss_bytes() -> int:
    """Resident memory of this process now."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since start or the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset the peak to the current resident size; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def median_and_spread(values: list[float]) -> str:
    """'median (min-max)' of a few timings, in seconds with 3 significant digits."""
    import statistics

    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"
