"""Run a snippet in a fresh Python process under hard limits, and measure what it cost.

For tests of inputs built to hang a reader or make it allocate without bound: run in-process, a
regression would hang the test run or take the machine down. Here the snippet gets an address-space
limit and a wall-clock timeout, and reports its peak resident memory, counting the decoding worker
processes it started (see :func:`run_bounded`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

_PRELUDE = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({address_space}, {address_space}))
sys.path.insert(0, {repo!r})

def warm_up():
    # Starts the decoding worker while this process is small: a child's peak memory as the kernel
    # reports it includes its parent's at the moment it was started.
    import io
    from PIL import Image
    from core.images import decode_upload
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    decode_upload(buffer.getvalue(), target_shape=(8, 8, 1), light_on_dark=False)

def report(**values):
    try:
        from core import decode_worker
        decode_worker.shutdown()  # waits for the workers, so their peak memory is counted
    except ImportError:
        pass
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Not own.ru_maxrss: Linux carries the parent's peak over into a child at exec, so a snippet
    # started by a large pytest process would report pytest's memory. VmHWM is this process's
    # own. A child's figure includes this process's peak when it started, which is counted anyway.
    with open("/proc/self/status") as status:
        own_peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    values["peak_rss"] = max(own_peak_kb, children.ru_maxrss) * 1024
    values["cpu"] = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    print("RESULT " + json.dumps(values))
"""


@dataclass(frozen=True)
class BoundedRun:
    """What a snippet printed and cost.

    Attributes:
        result: the keyword arguments the snippet passed to ``report(...)`` plus ``peak_rss``
            (bytes, the largest peak resident memory of the process and its finished children;
            Linux only) and ``cpu`` (seconds, the process and its finished children); None if it
            never reported (killed, crashed, timed out).
        timed_out: the wall-clock timeout expired and the process was killed.
        wall_seconds: how long it ran.
        output: its stdout and stderr, for assertion messages.
    """

    result: dict[str, Any] | None
    timed_out: bool
    wall_seconds: float
    output: str


def run_bounded(
    code: str, *, timeout: float = 60.0, address_space: int = 3 * 2**30, cwd: Path | None = None
) -> BoundedRun:
    """Run ``code`` with ``import``s from the repository, at most ``timeout`` s, ``address_space``.

    The snippet may call ``warm_up()`` (start the decoding worker early) and must call
    ``report(**values)`` to hand back results.
    """
    prelude = _PRELUDE.format(address_space=int(address_space), repo=str(REPO))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    started = time.monotonic()
    try:
        completed = subprocess.run(
            [sys.executable, "-c", prelude + textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=cwd or REPO,
        )
    except subprocess.TimeoutExpired as expired:
        # Captured output comes as bytes here, whatever text=True says.
        captured = expired.stdout
        output = captured.decode(errors="replace") if isinstance(captured, bytes) else ""
        return BoundedRun(None, True, time.monotonic() - started, output)
    wall = time.monotonic() - started
    output = completed.stdout + completed.stderr
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(lines[-1][len("RESULT ") :]) if lines else None
    return BoundedRun(result, False, wall, output)
