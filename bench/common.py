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


def write_results(name: str, title: str, body: str) -> Path:
    """Write ``bench/results/<name>.md`` with a header naming the command, machine and date."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    command = "python -m bench." + name + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    header = (
        f"# {title}\n\n"
        f"- Command: `{command}`\n"
        f"- Machine: {machine_description()}\n"
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, revision {git_revision()}\n\n"
    )
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(header + body.rstrip() + "\n")
    return path


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)
