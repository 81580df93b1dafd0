"""When the C allocator hands freed memory back to the system (glibc; elsewhere every call is a
no-op).

glibc serves an allocation above its *mmap threshold* with its own mapping, unmapped when freed,
and everything smaller from heaps (one per thread that allocates, up to 8 per core), which keep
freed memory for reuse. By default the threshold moves: freeing a mapped block raises it to that
block's size (up to 32 MiB), and the heaps then keep up to twice that unreturned. Three uses here
want something else:

- Featurising a dataset allocates every layer's activations anew, batch after batch: served
  from the heap, freed activations are reused instead of being faulted in again
  (:func:`activations_from_the_heap`; 16.5-19 ms per image against 26-33 ms, measured in
  ``core.features``).
- A server whose sessions come and go wants the opposite: arrays of a megabyte or more (a
  verification's retrained parameters, an upload's scores) mapped and unmapped, so memory goes
  back when they are freed instead of staying in heaps that other threads' small objects
  fragment (:func:`hand_back_large_buffers`, called by the dashboard's housekeeping).
- :func:`release_freed_memory` (``malloc_trim``) returns what the heaps hold free.

Setting a threshold turns glibc's dynamic adjustment off for the process, so the values outside
a featurising window are kept here (:func:`resting_thresholds`) and restored after it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

# glibc's mallopt parameters (malloc.h) and the largest values its dynamic thresholds reach
# on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX, and twice that for trimming).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
DYNAMIC_MMAP_MAX, DYNAMIC_TRIM_MAX = 32 * 2**20, 64 * 2**20
#: A server's thresholds (:func:`hand_back_large_buffers`): blocks from 1 MiB up are mapped, and
#: a heap keeps at most 4 MiB free at its top. Verify (k = 50, both models, 10 test images) took
#: 362-378 ms with these against 342-379 ms with glibc's defaults, alternating runs, load 1.0-1.2.
SERVER_MMAP_THRESHOLD, SERVER_TRIM_THRESHOLD = 2**20, 4 * 2**20
#: Environment variables with which an operator sets glibc's thresholds; when any is set, the
#: operator's values are left alone.
OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_lock = threading.Lock()
_heap_users = 0
_resting: list[int] = [DYNAMIC_MMAP_MAX, DYNAMIC_TRIM_MAX]


@functools.cache
def libc() -> Any | None:
    """glibc's functions, or None where there is no glibc (macOS, musl without mallopt)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        library = ctypes.CDLL(name)
        library.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        library.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return None
    return library


def resting_thresholds() -> tuple[int, int]:
    """(mmap threshold, trim threshold) in bytes set outside a featurising window."""
    with _lock:
        return _resting[0], _resting[1]


def _apply(c: Any, mmap_threshold: int, trim_threshold: int) -> None:
    c.mallopt(M_TRIM_THRESHOLD, trim_threshold)
    c.mallopt(M_MMAP_THRESHOLD, mmap_threshold)


def hand_back_large_buffers(environ: Mapping[str, str] | None = None) -> bool:
    """Map blocks of :data:`SERVER_MMAP_THRESHOLD` and more, trim heaps above
    :data:`SERVER_TRIM_THRESHOLD`, from now on and after every featurising window.

    For a long-running server: with glibc's moving thresholds, memory used by sessions that
    have ended stayed in the heaps (a 12-session load test ended 98 MiB above its baseline after
    ``malloc_trim``; with these values 16 MiB). Returns False, changing nothing, without glibc or
    when the operator set a threshold (:data:`OPERATOR_SETTINGS`, or ``glibc.malloc`` in
    ``GLIBC_TUNABLES``).
    """
    env = os.environ if environ is None else environ
    if any(name in env for name in OPERATOR_SETTINGS) or "glibc.malloc." in env.get(
        "GLIBC_TUNABLES", ""
    ):
        return False
    c = libc()
    if c is None:
        return False
    with _lock:
        _resting[:] = [SERVER_MMAP_THRESHOLD, SERVER_TRIM_THRESHOLD]
        if _heap_users == 0:
            _apply(c, SERVER_MMAP_THRESHOLD, SERVER_TRIM_THRESHOLD)
    return True


def release_freed_memory() -> bool:
    """Ask the C allocator to return freed pages to the system (glibc only; else a no-op).

    Python hands large freed buffers (an uploaded file's bytes) back to malloc, which keeps them
    for reuse; without this the process's resident memory would not show that they were freed.
    """
    c = libc()
    return bool(c.malloc_trim(0)) if c is not None else False


@contextlib.contextmanager
def activations_from_the_heap() -> Iterator[None]:
    """Serve a backbone's large activations from malloc's heap while featurising many images.

    torch allocates each layer's output anew; glibc maps allocations above its threshold
    straight from the kernel and unmaps them when freed, so every batch pays page faults (zeroed
    pages) for every large activation again. With mapping and trimming off for the duration,
    freed activations are reused. Afterwards the resting thresholds (:func:`resting_thresholds`)
    are set again and the freed memory is returned (``malloc_trim``). Process-wide, so nested
    and concurrent uses count.
    """
    global _heap_users
    c = libc()
    if c is None:
        yield
        return
    with _lock:
        _heap_users += 1
        if _heap_users == 1:
            c.mallopt(M_MMAP_THRESHOLD, 2**30)
            c.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        with _lock:
            _heap_users -= 1
            if _heap_users == 0:
                _apply(c, *_resting)
                c.malloc_trim(0)


def heap_users() -> int:
    """Featurising windows open now (:func:`activations_from_the_heap`)."""
    with _lock:
        return _heap_users
