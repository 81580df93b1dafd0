"""Decode images in worker processes that are limited in CPU time and memory.

Image decoders have slow paths that no header check fully anticipates: a progressive JPEG with
170,000 scans, a TIFF with 95,000 chained pages, a PNG of 870,000 empty chunks each cost seconds to
minutes of CPU inside Pillow's C code, where no Python-level timeout can interrupt them. So
:func:`decode` hands the bytes to a worker process and the limits are enforced by the kernel:

- **CPU time**: before each file the worker sets its ``RLIMIT_CPU`` soft limit to the CPU time it
  has used so far plus :attr:`DecodeBudget.cpu_seconds`; a decode that runs past it is killed by
  ``SIGXCPU`` and reported as too slow to decode. The parent also waits at most
  :attr:`DecodeBudget.wall_seconds` (a stopped or starved worker is killed then);
- **memory**: ``RLIMIT_AS`` allows the worker its current size plus
  :attr:`DecodeBudget.memory_bytes`; an allocation beyond that fails and is reported as needing too
  much memory. The server's own memory never holds a full-size decode.

Workers are started once and reused (at most :data:`MAX_WORKERS` at a time, so concurrent uploads
do not queue behind each other on a 2-core machine); one that was killed, or grew large, is replaced
on the next request. Starting one costs about 0.35 s of CPU (Python, numpy and Pillow); a request to
a running one adds about a millisecond.

The worker answers with JSON and raw pixel bytes, never a pickle: a worker subverted by a crafted
file must not be able to run code in the server by what it sends back. Where worker processes are
not available (not POSIX, or one cannot be started) the pipeline runs in this process, with every
check but these two limits, and a warning is logged once.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from core.errors import ImageDecodeError

if TYPE_CHECKING:
    from core.images import DecodedImage

try:
    import fcntl
    import resource
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]
    resource = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

MAX_WORKERS = 2
"""Decoding worker processes per server process, at most (one per core of the target machine)."""

_BASE_PIXELS = 40_000_000
# At most this long a worker may take to start (Python + numpy + Pillow take ~0.4 s when idle).
_START_SECONDS = 30.0
# A worker whose resident memory stays above this after a file is replaced rather than kept.
_RETIRE_RSS_BYTES = 256 * 2**20
_PIPE_BYTES = 1 << 20
_FRAME = struct.Struct(">II")
_MAX_HEADER_BYTES = 1 << 20
_BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from core.decode_worker import serve; serve()"


@dataclass(frozen=True)
class DecodeBudget:
    """What one file may cost its worker.

    Attributes:
        cpu_seconds: CPU time for the whole pipeline (legitimate 40-megapixel files need at most
            about 1.5 s; the limit is whole seconds because ``RLIMIT_CPU`` is).
        memory_bytes: address space the worker may grow by (legitimate 40-megapixel files need at
            most about 500 MB).
        wall_seconds: how long the caller waits, for a worker that is starved or stopped rather
            than busy.
    """

    cpu_seconds: int = 5
    memory_bytes: int = 2**30
    wall_seconds: float = 60.0

    @classmethod
    def for_pixels(cls, max_pixels: int) -> DecodeBudget:
        """The default budget, scaled up for a pixel limit above the 40-megapixel default."""
        factor = max(1.0, max_pixels / _BASE_PIXELS)
        base = cls()
        return cls(
            cpu_seconds=math.ceil(base.cpu_seconds * factor),
            memory_bytes=math.ceil(base.memory_bytes * factor),
            wall_seconds=base.wall_seconds * factor,
        )


def decode(
    data: bytes, *, target_shape: tuple[int, int, int], light_on_dark: bool, max_pixels: int
) -> DecodedImage:
    """Run :func:`core.images.decode_in_process` on ``data`` in a limited worker process.

    Raises:
        ImageDecodeError: whatever the pipeline raises, or the worker ran out of CPU time or
            memory, or died, with a message for the user.
    """
    (result,) = decode_many(
        [data], target_shape=target_shape, light_on_dark=light_on_dark, max_pixels=max_pixels
    )
    if isinstance(result, ImageDecodeError):
        raise result
    return result


def decode_many(
    files: Sequence[bytes],
    *,
    target_shape: tuple[int, int, int],
    light_on_dark: bool,
    max_pixels: int,
) -> list[DecodedImage | ImageDecodeError]:
    """Decode several files in one round trip to a worker, each within its own budget.

    For dataset folders: one request per file costs a wait for the worker to be scheduled, which on
    a busy machine is most of the time a small image takes. The worker re-arms its CPU and memory
    limits before every file, so each still gets exactly one :class:`DecodeBudget`; a file that
    kills its worker costs only itself (the rest go to a new worker).

    Returns:
        For each file, in order, its decoded image or the error that refused it.
    """
    budget = DecodeBudget.for_pixels(max_pixels)
    request = {
        "target_shape": list(target_shape),
        "light_on_dark": light_on_dark,
        "max_pixels": max_pixels,
        "cpu_seconds": budget.cpu_seconds,
        "memory_bytes": budget.memory_bytes,
    }
    results: list[DecodedImage | ImageDecodeError | None] = [None] * len(files)
    pending = list(range(len(files)))
    while pending:
        worker = _POOL.acquire() if _isolation_available() else None
        if worker is None:
            for index in pending:
                results[index] = _decode_here(files[index], target_shape, light_on_dark, max_pixels)
            break
        healthy = False
        done: list[int] = []
        rss: object = None
        try:
            for position, reply, pixels in worker.ask(
                request, [files[index] for index in pending], budget
            ):
                index = pending[position]
                results[index] = _result_from_reply(reply, pixels, target_shape)
                done.append(index)
                rss = reply.get("rss")
            # Only a worker that answered everything goes back to the pool: one with replies
            # still in its pipe would hand them to the next caller.
            healthy = isinstance(rss, int) and rss <= _RETIRE_RSS_BYTES
        except ImageDecodeError as exc:
            # The worker died on the next file in line: that file is refused, the rest retried.
            results[pending[len(done)]] = exc
            done.append(pending[len(done)])
        finally:
            _POOL.release(worker, healthy=healthy)
        pending = pending[len(done) :]
    return [r if r is not None else ImageDecodeError("The image was not decoded.") for r in results]


def _decode_here(
    data: bytes, target_shape: tuple[int, int, int], light_on_dark: bool, max_pixels: int
) -> DecodedImage | ImageDecodeError:
    from core.images import decode_in_process

    try:
        return decode_in_process(
            data,
            target_shape=target_shape,
            light_on_dark=light_on_dark,
            max_bytes=len(data),
            max_pixels=max_pixels,
        )
    except ImageDecodeError as exc:
        return exc


def shutdown() -> None:
    """Stop every idle worker (they also stop by themselves when this process exits)."""
    _POOL.shutdown()


# --- the parent's side ------------------------------------------------------------------------------


class _Worker:
    """One worker process and the pipes to it."""

    def __init__(self) -> None:
        code_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        # One thread each: numpy's BLAS pools would only add address space and compete for cores.
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOT, code_root],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        if self.process.stdin is None or self.process.stdout is None:  # pragma: no cover
            self.kill()
            raise OSError("the decoding worker has no pipes")
        self._stdin: IO[bytes] = self.process.stdin
        self._stdout_fd = self.process.stdout.fileno()
        for descriptor in (self._stdin.fileno(), self._stdout_fd):
            _widen_pipe(descriptor)
        reply, _ = self._receive(time.monotonic() + _START_SECONDS)
        if not reply.get("ready"):
            raise OSError("the decoding worker did not start")

    def ask(
        self, request: dict[str, Any], files: Sequence[bytes], budget: DecodeBudget
    ) -> Iterator[tuple[int, dict[str, Any], bytes]]:
        """Send ``files`` in one request; yield (position, reply, pixels) as each is answered.

        Raises:
            ImageDecodeError: the worker died or stopped answering (it is killed); the file it
                was on is the one after the last yielded.
        """
        try:
            _send(self._stdin, {**request, "files": [len(data) for data in files]}, files)
            for position in range(len(files)):
                reply, pixels = self._receive(time.monotonic() + budget.wall_seconds)
                yield position, reply, pixels
        except _WorkerTimeout:
            self.kill()
            raise ImageDecodeError(
                f"Decoding this image took longer than {budget.wall_seconds:.0f} s, so it was "
                "stopped. The server may be very busy; try again, or save the image again as an "
                "ordinary PNG or JPEG."
            ) from None
        except (OSError, ValueError, _WorkerGone):
            self.kill()
            raise ImageDecodeError(self._describe_death(budget)) from None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()

    def close(self) -> None:
        """Ask the worker to exit (end of its input), then make sure it has."""
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()
        with contextlib.suppress(OSError):
            if self.process.stdout is not None:
                self.process.stdout.close()

    def _describe_death(self, budget: DecodeBudget) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        code = self.process.returncode
        if code == -signal.SIGXCPU:
            return (
                f"Decoding this image needed more than {budget.cpu_seconds} s of processor time, "
                "so it was stopped: the file is built in a way that makes decoding very slow (or "
                "is damaged). Save it again as an ordinary PNG or JPEG."
            )
        return (
            "The image decoder stopped while reading this file (it is probably damaged or built "
            "to exhaust the decoder). Save it again as an ordinary PNG or JPEG."
        )

    def _receive(self, deadline: float) -> tuple[dict[str, Any], bytes]:
        header_length, payload_length = _FRAME.unpack(self._read_exactly(_FRAME.size, deadline))
        if header_length > _MAX_HEADER_BYTES:
            raise _WorkerGone("oversized reply")
        header = json.loads(self._read_exactly(header_length, deadline))
        if not isinstance(header, dict):
            raise _WorkerGone("malformed reply")
        return header, self._read_exactly(payload_length, deadline)

    def _read_exactly(self, size: int, deadline: float) -> bytes:
        chunks: list[bytes] = []
        remaining = size
        while remaining:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise _WorkerTimeout
            ready, _, _ = select.select([self._stdout_fd], [], [], timeout)
            if not ready:
                continue
            chunk = os.read(self._stdout_fd, min(remaining, 1 << 20))
            if not chunk:
                raise _WorkerGone("end of output")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)


class _WorkerGone(Exception):
    """The worker closed its output (it exited or was killed) or sent nonsense."""


class _WorkerTimeout(Exception):
    """The worker did not answer before the wall-clock deadline."""


class _Pool:
    """Up to MAX_WORKERS workers, each serving one request at a time."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._idle: list[_Worker] = []
        self._count = 0
        self._pid = os.getpid()
        self._unavailable = False

    def acquire(self) -> _Worker | None:
        with self._condition:
            self._forget_after_fork()
            if self._unavailable:
                return None
            while not self._idle and self._count >= MAX_WORKERS:
                self._condition.wait()
            if self._idle:
                return self._idle.pop()
            self._count += 1
        try:
            return _Worker()
        except (OSError, ValueError, _WorkerGone, _WorkerTimeout) as exc:
            with self._condition:
                self._count -= 1
                self._unavailable = True
                self._condition.notify()
            logger.warning(
                "images: cannot start a decoding worker (%s); decoding in this process, without "
                "its CPU-time and memory limits",
                exc,
            )
            return None

    def release(self, worker: _Worker, *, healthy: bool) -> None:
        alive = healthy and worker.process.poll() is None
        if not alive:
            worker.kill()
        with self._condition:
            if os.getpid() != self._pid:
                return
            if alive:
                self._idle.append(worker)
            else:
                self._count -= 1
            self._condition.notify()

    def shutdown(self) -> None:
        with self._condition:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            owned = os.getpid() == self._pid
        if owned:
            for worker in idle:
                worker.close()

    def _forget_after_fork(self) -> None:
        # A forked child shares its parent's pipes; talking to the parent's workers would mix up
        # both conversations. It starts its own.
        if os.getpid() != self._pid:
            self._idle, self._count, self._pid = [], 0, os.getpid()


_POOL = _Pool()
atexit.register(shutdown)


def _widen_pipe(descriptor: int) -> None:
    # A 10 MB upload through a 64 KB pipe takes ~160 context switches, each a wait for the other
    # process to be scheduled on a busy machine; 1 MB pipes (Linux's default ceiling) take 10.
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if set_size is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(descriptor, set_size, _PIPE_BYTES)


def _isolation_available() -> bool:
    return resource is not None and os.name == "posix"


def _result_from_reply(
    reply: dict[str, Any], pixels: bytes, target_shape: tuple[int, int, int]
) -> DecodedImage | ImageDecodeError:
    try:
        return _decoded_from_reply(reply, pixels, target_shape)
    except ImageDecodeError as exc:
        return exc


def _decoded_from_reply(
    reply: dict[str, Any], pixels: bytes, target_shape: tuple[int, int, int]
) -> DecodedImage:
    import numpy as np

    from core.images import SUPPORTED_FORMATS, DecodedImage

    if not reply.get("ok"):
        message = reply.get("message")
        raise ImageDecodeError(
            message
            if isinstance(message, str) and message
            else "The image could not be decoded. Save it again as an ordinary PNG or JPEG."
        )
    # Checked, not trusted: the reply comes from a process that has just parsed hostile input.
    try:
        size = tuple(int(v) for v in reply["original_size"])
        mode, fmt = str(reply["original_mode"]), str(reply["format"])
        notes = tuple(str(note) for note in reply["notes"])
        valid = (
            len(size) == 2 and fmt in SUPPORTED_FORMATS and len(pixels) == math.prod(target_shape)
        )
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise ImageDecodeError(
            "The image decoder gave an unusable answer for this file. Save it again as an "
            "ordinary PNG or JPEG."
        )
    image = np.frombuffer(pixels, dtype=np.uint8).reshape(target_shape)
    return DecodedImage(
        image=image, original_size=size, original_mode=mode, format=fmt, notes=notes
    )


def _send(stream: IO[bytes], header: dict[str, Any], payloads: Sequence[bytes]) -> None:
    encoded = json.dumps(header).encode("utf-8")
    stream.write(_FRAME.pack(len(encoded), sum(len(p) for p in payloads)) + encoded)
    for payload in payloads:
        stream.write(payload)
    stream.flush()


# --- the worker's side ------------------------------------------------------------------------------


def serve() -> None:
    """The worker's main loop: read a request, decode within its limits, answer; until end of input."""
    requests = sys.stdin.buffer
    # Replies get their own descriptor; anything a library prints goes to stderr instead of into
    # the reply stream.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    if resource is not None:
        # SIGXCPU's default action dumps core; a killed decode must not leave files behind.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    from core.images import decode_in_process

    _send(replies, {"ready": True}, [])
    while True:
        frame = requests.read(_FRAME.size)
        if len(frame) < _FRAME.size:
            return
        header_length, payload_length = _FRAME.unpack(frame)
        request = json.loads(requests.read(header_length))
        payload = requests.read(payload_length)
        if len(payload) < payload_length:
            return
        start = 0
        for length in request["files"]:
            data = payload[start : start + length]
            start += length
            # Re-armed for every file: each gets the whole budget, and no more.
            _limit(int(request["cpu_seconds"]), int(request["memory_bytes"]))
            reply, pixels = _decode_one(data, request, decode_in_process)
            del data
            reply["rss"] = _resident_bytes()
            _send(replies, reply, [pixels])
        del payload


def _decode_one(
    data: bytes, request: dict[str, Any], decode_in_process: Any
) -> tuple[dict[str, Any], bytes]:
    try:
        decoded = decode_in_process(
            data,
            target_shape=tuple(request["target_shape"]),
            light_on_dark=bool(request["light_on_dark"]),
            max_bytes=max(1, len(data)),
            max_pixels=int(request["max_pixels"]),
        )
    except ImageDecodeError as exc:
        return {"ok": False, "message": str(exc)}, b""
    except Exception as exc:  # a bug here must still produce an answer, not a dead worker
        print(f"decode worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {"ok": False, "message": ""}, b""
    reply = {
        "ok": True,
        "original_size": list(decoded.original_size),
        "original_mode": decoded.original_mode,
        "format": decoded.format,
        "notes": list(decoded.notes),
    }
    return reply, decoded.image.tobytes()


def _limit(cpu_seconds: int, memory_bytes: int) -> None:
    """Allow this process ``cpu_seconds`` more CPU time and ``memory_bytes`` more address space."""
    if resource is None:
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _set_soft_limit(resource.RLIMIT_CPU, math.ceil(usage.ru_utime + usage.ru_stime) + cpu_seconds)
    size = _address_space_bytes()
    if size is not None:
        _set_soft_limit(resource.RLIMIT_AS, size + memory_bytes)


def _set_soft_limit(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(which, (value, hard))


def _statm(field: int) -> int | None:
    try:
        with open("/proc/self/statm", "rb") as stream:
            return int(stream.read().split()[field]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _address_space_bytes() -> int | None:
    return _statm(0)


def _resident_bytes() -> int:
    return _statm(1) or 0
