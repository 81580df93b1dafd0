"""The allocator's thresholds: a server's (large blocks mapped, so memory goes back when freed),
kept across featurising windows, and left alone when the operator set them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from core import allocator


class Recording:
    """Stands in for glibc: records mallopt and malloc_trim calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append((0, pad))
        return 1


@pytest.fixture
def libc(monkeypatch: pytest.MonkeyPatch) -> Recording:
    recording = Recording()
    monkeypatch.setattr(allocator, "libc", lambda: recording)
    monkeypatch.setattr(
        allocator, "_resting", [allocator.DYNAMIC_MMAP_MAX, allocator.DYNAMIC_TRIM_MAX]
    )
    return recording


def test_a_server_maps_large_blocks_from_now_on_and_after_featurising(libc: Recording) -> None:
    assert allocator.hand_back_large_buffers(environ={})
    server = [
        (allocator.M_TRIM_THRESHOLD, allocator.SERVER_TRIM_THRESHOLD),
        (allocator.M_MMAP_THRESHOLD, allocator.SERVER_MMAP_THRESHOLD),
    ]
    assert libc.calls == server
    assert allocator.resting_thresholds() == (2**20, 4 * 2**20)
    libc.calls.clear()
    with allocator.activations_from_the_heap():
        pass
    # The window ends with the server's thresholds, not glibc's dynamic maxima.
    assert libc.calls[2:] == [*server, (0, 0)]


def test_a_server_started_while_featurising_waits_for_the_window_to_end(libc: Recording) -> None:
    with allocator.activations_from_the_heap():
        libc.calls.clear()
        assert allocator.hand_back_large_buffers(environ={})
        assert libc.calls == []  # the window's thresholds stay while it is open
    assert libc.calls == [
        (allocator.M_TRIM_THRESHOLD, allocator.SERVER_TRIM_THRESHOLD),
        (allocator.M_MMAP_THRESHOLD, allocator.SERVER_MMAP_THRESHOLD),
        (0, 0),
    ]


@pytest.mark.parametrize(
    "environ",
    [
        {"MALLOC_MMAP_THRESHOLD_": "65536"},
        {"MALLOC_TRIM_THRESHOLD_": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},
    ],
)
def test_an_operators_settings_are_left_alone(libc: Recording, environ: dict[str, str]) -> None:
    assert not allocator.hand_back_large_buffers(environ=environ)
    assert libc.calls == []
    assert allocator.resting_thresholds() == (
        allocator.DYNAMIC_MMAP_MAX,
        allocator.DYNAMIC_TRIM_MAX,
    )


PROBE = textwrap.dedent(
    """
    import ctypes, sys
    import numpy as np
    from core import allocator

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = Info
    # Freeing a 30 MiB mapped block raises glibc's dynamic threshold to 30 MiB.
    block = np.ones(30 * 2**17)
    del block
    if sys.argv[1] == "server":
        assert allocator.hand_back_large_buffers(environ={})
    before = mallinfo2().hblkhd
    held = np.ones(2**18)  # 2 MiB
    print(mallinfo2().hblkhd - before)
    """
)


@pytest.mark.skipif(allocator.libc() is None, reason="glibc only")
def test_after_hand_back_a_two_mebibyte_array_is_mapped_not_kept_in_a_heap() -> None:
    def mapped_bytes(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout.split()[-1])

    assert mapped_bytes("server") >= 2 * 2**20
    # Without it the same array comes from the heap (what kept ended sessions' memory).
    assert mapped_bytes("default") == 0
