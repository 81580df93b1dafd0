"""ArtifactStore: round trip, every kind of damage is rebuilt, concurrent builders, unwritable dirs."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from core import store as store_module
from core.errors import CacheError
from core.store import (
    SECRET_FILENAME,
    ArtifactStore,
    CacheKey,
    decode_artifact,
    default_cache_dir,
    load_or_create_secret,
)


def make_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "features": rng.standard_normal((5, 7)).astype(np.float32),
        "gram": rng.standard_normal((4, 4)),
        "labels": np.arange(5, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "pixels": rng.integers(0, 256, size=(2, 3, 3, 1), dtype=np.uint8),
        "names": np.array(["shirt", "coat"]),
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 3), dtype=np.float64),
    }


def assert_same_arrays(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, array in expected.items():
        assert actual[name].dtype == array.dtype, name
        assert actual[name].shape == array.shape, name
        np.testing.assert_array_equal(actual[name], array, err_msg=name)


@pytest.fixture
def key() -> CacheKey:
    return CacheKey.of(
        "features", {"dataset": "abc123", "backbone": "pixels", "version": 2, "lam": 1e-3}
    )


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "cache")


class CountingBuild:
    """A build callable that records how often it ran."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.calls = 0

    def __call__(self) -> dict[str, np.ndarray]:
        self.calls += 1
        return self.arrays


# -- keys ------------------------------------------------------------------------------------------


def test_key_is_order_independent_and_its_digest_is_sha256_of_canonical_json() -> None:
    a = CacheKey.of("kernel", {"gamma": 0.05, "dataset": "d1", "n": 10})
    b = CacheKey.of("kernel", {"n": 10, "dataset": "d1", "gamma": 0.05})
    assert a == b and hash(a) == hash(b)
    canonical = '{"fields":{"dataset":"d1","gamma":0.05,"n":10},"kind":"kernel"}'
    assert a.digest == hashlib.sha256(canonical.encode()).hexdigest()
    assert a.filename == f"kernel-{a.digest}.artifact"
    assert CacheKey.of("kernel", {"n": 11, "dataset": "d1", "gamma": 0.05}).digest != a.digest


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("Bad Kind", {"a": 1}),
        ("../escape", {"a": 1}),
        ("ok", {"a": [1, 2]}),
        ("ok", {"a": None}),
        ("ok", {"a": float("nan")}),
        ("ok", {"a": np.float64(1.0).view(np.int64)}),
    ],
)
def test_key_rejects_unsafe_kinds_and_non_scalar_values(kind: str, fields: dict) -> None:
    with pytest.raises(CacheError):
        CacheKey.of(kind, fields)


def test_default_root_comes_from_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("INFLUENCE_CACHE_DIR", str(tmp_path / "here"))
    assert ArtifactStore().root == tmp_path / "here"
    monkeypatch.delenv("INFLUENCE_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "influence-explorer"


# -- round trip ------------------------------------------------------------------------------------


def test_round_trip_keeps_dtypes_shapes_values_and_meta(
    store: ArtifactStore, key: CacheKey
) -> None:
    arrays = make_arrays()
    assert store.load(key) is None
    path = store.save(key, arrays, meta={"seconds": 1.5, "note": "test"})
    assert path == store.path_for(key) and path.exists()
    assert path.name.startswith("features-")
    assert_same_arrays(store.load(key), arrays)
    artifact = store.load_artifact(key)
    assert artifact.meta == {"seconds": 1.5, "note": "test"}
    assert artifact.created > 0
    # Nothing but the artifact (and the installation's key) is left behind (no temp files).
    assert sorted(p.name for p in store.root.iterdir()) == [SECRET_FILENAME, path.name]


def test_get_or_create_builds_once_then_reads(store: ArtifactStore, key: CacheKey) -> None:
    build = CountingBuild(make_arrays())
    first = store.get_or_create(key, build)
    second = store.get_or_create(key, build)
    assert build.calls == 1
    assert_same_arrays(first, build.arrays)
    assert_same_arrays(second, build.arrays)


def test_object_arrays_and_unserialisable_meta_are_refused(
    store: ArtifactStore, key: CacheKey
) -> None:
    with pytest.raises(CacheError, match="pickle"):
        store.save(key, {"bad": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(CacheError, match="JSON"):
        store.save(key, {"ok": np.zeros(2)}, meta={"when": object()})
    assert not store.path_for(key).exists()


# -- damage ----------------------------------------------------------------------------------------


def _prefix_size() -> int:
    return store_module._PREFIX.size


def _damage_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_at(offset_from: str, offset: int):
    def damage(path: Path) -> None:
        data = bytearray(path.read_bytes())
        position = offset if offset_from == "start" else len(data) - offset
        data[position] ^= 0x5A
        path.write_bytes(bytes(data))

    return damage


DAMAGE = {
    "truncated": _damage_truncate,
    "emptied": lambda path: path.write_bytes(b""),
    "flip-payload-middle": lambda path: _flip_at("start", path.stat().st_size // 2 + 40)(path),
    "flip-payload-last-byte": _flip_at("end", 1),
    "flip-header-magic": _flip_at("start", 0),
    "flip-header-version": _flip_at("start", 8),
    "flip-header-meta-length": _flip_at("start", 12),
    "flip-header-payload-length": _flip_at("start", 16),
    "flip-header-digest": _flip_at("start", 30),
    "flip-meta-json": lambda path: _flip_at("start", _prefix_size() + 3)(path),
    "appended-garbage": lambda path: path.write_bytes(path.read_bytes() + b"\0"),
    "not-an-artifact": lambda path: path.write_bytes(b"PK\x03\x04 some zip file"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_file_is_detected_removed_and_rebuilt(
    damage: str, store: ArtifactStore, key: CacheKey, caplog: pytest.LogCaptureFixture
) -> None:
    build = CountingBuild(make_arrays())
    store.get_or_create(key, build)
    DAMAGE[damage](store.path_for(key))

    with caplog.at_level(logging.WARNING, logger="core.store"):
        rebuilt = store.get_or_create(key, build)

    assert build.calls == 2, "a damaged artifact must never be trusted"
    assert_same_arrays(rebuilt, build.arrays)
    assert any("damaged" in record.getMessage() for record in caplog.records)
    # The replacement on disk is whole again.
    assert_same_arrays(decode_artifact(store.path_for(key).read_bytes(), key).arrays, build.arrays)


def test_each_damage_is_reported_as_cache_error(store: ArtifactStore, key: CacheKey) -> None:
    # decode_artifact itself (not only the store) refuses every damaged variant.
    store.save(key, make_arrays())
    secret = load_or_create_secret(store.root)
    pristine = store.path_for(key).read_bytes()
    for name, damage in DAMAGE.items():
        store.path_for(key).write_bytes(pristine)
        damage(store.path_for(key))
        with pytest.raises(CacheError):
            decode_artifact(store.path_for(key).read_bytes(), key, secret=secret)
            pytest.fail(f"{name} was not detected")


def test_stale_format_version_is_rebuilt(
    store: ArtifactStore, key: CacheKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = CountingBuild(make_arrays())
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "FORMAT_VERSION", store_module.FORMAT_VERSION - 1)
        store.get_or_create(key, build)
    with pytest.raises(CacheError, match="format version"):
        decode_artifact(store.path_for(key).read_bytes(), key)
    store.get_or_create(key, build)
    assert build.calls == 2


def test_file_holding_another_key_is_not_trusted(store: ArtifactStore, key: CacheKey) -> None:
    other = CacheKey.of("features", {"dataset": "different"})
    store.save(other, {"x": np.ones(3)})
    # E.g. a file copied or renamed by hand: same name as `key`, contents of `other`.
    store.path_for(key).write_bytes(store.path_for(other).read_bytes())
    assert store.load(key) is None
    assert not store.path_for(key).exists()
    assert store.load(other) is not None


def test_file_deleted_between_lookup_and_read_is_rebuilt(
    store: ArtifactStore, key: CacheKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = CountingBuild(make_arrays())
    store.get_or_create(key, build)
    real_read = store_module._read_file
    vanished = []

    def read_after_someone_deleted_it(path: Path) -> bytes:
        if not vanished:  # only the first read: the file disappears just before open()
            vanished.append(path)
            path.unlink()
        return real_read(path)

    monkeypatch.setattr(store_module, "_read_file", read_after_someone_deleted_it)
    rebuilt = store.get_or_create(key, build)
    assert vanished == [store.path_for(key)]
    assert build.calls == 2
    assert_same_arrays(rebuilt, build.arrays)
    assert store.load(key) is not None


# -- concurrency -----------------------------------------------------------------------------------


RACE_KEY = CacheKey.of("race", {"dataset": "shared"})


def _race_arrays() -> dict[str, np.ndarray]:
    return {"values": np.arange(1000, dtype=np.float64).reshape(10, 100) / 7.0}


def _slow_build(marker: str) -> dict[str, np.ndarray]:
    with open(marker, "a") as handle:
        handle.write("built\n")
    time.sleep(1.0)  # long enough that the other process asks while this build is running
    return _race_arrays()


def _race_worker(root: str, marker: str, barrier, results) -> None:
    store = ArtifactStore(Path(root))
    barrier.wait()
    arrays = store.get_or_create(RACE_KEY, lambda: _slow_build(marker))
    results.put({name: array.tolist() for name, array in arrays.items()})


def test_two_processes_racing_on_one_key_build_once(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    marker = tmp_path / "builds.txt"
    root = tmp_path / "cache"
    workers = [
        context.Process(target=_race_worker, args=(str(root), str(marker), barrier, results))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    outputs = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    assert marker.read_text().splitlines() == ["built"]
    expected = _race_arrays()["values"]
    for output in outputs:
        np.testing.assert_array_equal(np.array(output["values"]), expected)
    on_disk = decode_artifact(ArtifactStore(root).path_for(RACE_KEY).read_bytes(), RACE_KEY)
    np.testing.assert_array_equal(on_disk.arrays["values"], expected)
    assert not list(root.glob("*.tmp"))


# -- crashes ---------------------------------------------------------------------------------------


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def _builder_that_hangs(root: str, marker: str) -> None:
    def build() -> dict[str, np.ndarray]:
        Path(marker).write_text("building")
        time.sleep(600)  # killed long before this ends
        return _race_arrays()

    ArtifactStore(Path(root)).get_or_create(RACE_KEY, build)


def test_builder_killed_mid_build_releases_its_lock(tmp_path: Path) -> None:
    # A dashboard killed while preparing must not leave the next one waiting forever: the
    # kernel drops a dead process's flock, and no half-built artifact is left behind.
    context = multiprocessing.get_context("spawn")
    marker = tmp_path / "building"
    root = tmp_path / "cache"
    worker = context.Process(target=_builder_that_hangs, args=(str(root), str(marker)))
    worker.start()
    try:
        _wait_for(marker)
    finally:
        worker.kill()
        worker.join(timeout=60)
    assert not ArtifactStore(root).path_for(RACE_KEY).exists()

    build = CountingBuild(_race_arrays())
    started = time.monotonic()
    arrays = ArtifactStore(root).get_or_create(RACE_KEY, build)
    assert build.calls == 1 and time.monotonic() - started < 30
    assert_same_arrays(arrays, _race_arrays())


def _writer_killed_before_rename(root: str, marker: str) -> None:
    real_fsync = store_module.os.fsync

    def fsync_then_hang(descriptor: int) -> None:
        real_fsync(descriptor)
        Path(marker).write_text("written, not yet renamed")
        time.sleep(600)

    store_module.os.fsync = fsync_then_hang
    ArtifactStore(Path(root)).save(RACE_KEY, {"values": np.full((10, 100), 7.0)})


def test_writer_killed_mid_write_leaves_the_old_artifact_intact(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = ArtifactStore(root)
    store.save(RACE_KEY, _race_arrays())
    context = multiprocessing.get_context("spawn")
    marker = tmp_path / "written"
    worker = context.Process(target=_writer_killed_before_rename, args=(str(root), str(marker)))
    worker.start()
    try:
        _wait_for(marker)
    finally:
        worker.kill()
        worker.join(timeout=60)
    # Readers see the complete old file, never the new one half-way; the orphaned temporary
    # file is hidden and never read as an artifact.
    assert_same_arrays(store.load(RACE_KEY), _race_arrays())
    assert [path.name for path in root.glob("*.artifact")] == [RACE_KEY.filename]


# -- unwritable ------------------------------------------------------------------------------------


def test_unwritable_cache_dir_still_returns_built_arrays(
    tmp_path: Path, key: CacheKey, caplog: pytest.LogCaptureFixture
) -> None:
    # A regular file where a directory should be: fails even for root, unlike chmod.
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    store = ArtifactStore(blocker / "cache")
    build = CountingBuild(make_arrays())
    with caplog.at_level(logging.WARNING, logger="core.store"):
        first = store.get_or_create(key, build)
        second = store.get_or_create(key, build)
    assert_same_arrays(first, build.arrays)
    assert_same_arrays(second, build.arrays)
    assert build.calls == 2  # nothing could be cached
    assert store.save(key, build.arrays) is None
    warnings = [r.getMessage() for r in caplog.records if "not writable" in r.getMessage()]
    assert len(warnings) == 1, "warn once per store, not on every call"


def test_failed_write_leaves_no_partial_file(
    store: ArtifactStore, key: CacheKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.os, "replace", refuse)
    assert store.save(key, make_arrays()) is None
    assert [p.name for p in store.root.iterdir()] == [SECRET_FILENAME]


def test_meta_in_file_is_readable_json_with_the_key(store: ArtifactStore, key: CacheKey) -> None:
    store.save(key, {"x": np.zeros(2)})
    data = store.path_for(key).read_bytes()
    _, _, meta_length, _, _ = store_module._PREFIX.unpack_from(data)
    document = json.loads(data[_prefix_size() : _prefix_size() + meta_length])
    assert document["key"] == key.as_dict()
    assert document["arrays"] == {"x": ["<f8", [2]]}


def test_file_system_without_locks_still_builds_and_caches(
    store: ArtifactStore, key: CacheKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_locks(*_args: object) -> None:
        raise OSError(37, "No locks available")

    monkeypatch.setattr(store_module.fcntl, "flock", no_locks)
    build = CountingBuild(make_arrays())
    store.get_or_create(key, build)
    store.get_or_create(key, build)
    assert build.calls == 1


# -- authenticity ----------------------------------------------------------------------------------


def _forge(store: ArtifactStore, key: CacheKey, secret: bytes | None) -> dict[str, np.ndarray]:
    """Rewrite the stored artifact with changed values and a correct checksum (anyone who can write
    to the cache directory can do this)."""
    path = store.path_for(key)
    arrays = dict(decode_artifact(path.read_bytes(), key).arrays)
    arrays["features"] = arrays["features"] + 1.0  # e.g. shift every score
    if secret is None:
        path.write_bytes(store_module.encode_artifact(key, arrays))
    else:
        path.write_bytes(store_module.encode_artifact(key, arrays, secret=secret))
    return arrays


@pytest.mark.parametrize("forger_key", ["none", "their_own"])
def test_a_forged_file_with_a_valid_checksum_is_rebuilt_not_trusted(
    forger_key: str, store: ArtifactStore, key: CacheKey, caplog: pytest.LogCaptureFixture
) -> None:
    build = CountingBuild(make_arrays())
    store.get_or_create(key, build)
    forged = _forge(store, key, None if forger_key == "none" else b"k" * 32)
    # The checksum alone would have let it through.
    np.testing.assert_array_equal(
        decode_artifact(store.path_for(key).read_bytes(), key).arrays["features"],
        forged["features"],
    )

    with caplog.at_level(logging.WARNING, logger="core.store"):
        served = store.get_or_create(key, build)

    assert build.calls == 2, "a forged artifact must never be trusted"
    assert_same_arrays(served, build.arrays)
    assert any("HMAC-SHA256" in record.getMessage() for record in caplog.records)


def test_the_key_is_created_owner_only_and_reused(store: ArtifactStore, key: CacheKey) -> None:
    store.save(key, make_arrays())
    path = store.root / SECRET_FILENAME
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(path.read_bytes()) == 32
    assert load_or_create_secret(store.root) == path.read_bytes()
    assert not list(store.root.glob("*.tmp"))


@pytest.mark.parametrize("problem", ["world_readable", "group_writable", "symlink", "wrong_size"])
def test_a_key_file_that_others_could_read_is_replaced_with_a_warning(
    problem: str, store: ArtifactStore, key: CacheKey, caplog: pytest.LogCaptureFixture
) -> None:
    build = CountingBuild(make_arrays())
    store.get_or_create(key, build)
    path = store.root / SECRET_FILENAME
    old = path.read_bytes()
    if problem == "world_readable":
        path.chmod(0o644)
    elif problem == "group_writable":
        path.chmod(0o620)
    elif problem == "symlink":
        elsewhere = store.root.parent / "planted-key"
        elsewhere.write_bytes(old)
        elsewhere.chmod(0o600)
        path.unlink()
        path.symlink_to(elsewhere)
    else:
        path.write_bytes(old[:16])

    with caplog.at_level(logging.WARNING, logger="core.store"):
        store.get_or_create(key, build)

    assert any("replacing it with a new key" in r.getMessage() for r in caplog.records)
    assert not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes() != old
    # What was written under the old key could have been forged by whoever read it: rebuilt.
    assert build.calls == 2


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a file away needs root"
)
def test_a_key_file_of_another_user_is_replaced(
    store: ArtifactStore, key: CacheKey, caplog: pytest.LogCaptureFixture
) -> None:
    store.save(key, make_arrays())
    path = store.root / SECRET_FILENAME
    old = path.read_bytes()
    os.chown(path, 4242, 4242)  # planted by someone else, who knows its contents
    with caplog.at_level(logging.WARNING, logger="core.store"):
        new = load_or_create_secret(store.root)
    assert new != old and path.stat().st_uid == os.geteuid()
    assert any("belongs to another user" in r.getMessage() for r in caplog.records)


def test_without_a_usable_key_nothing_is_trusted(
    store: ArtifactStore, key: CacheKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = CountingBuild(make_arrays())
    store.get_or_create(key, build)
    # Every key file looks foreign (as on a shared directory where replacing it fails).
    monkeypatch.setattr(store_module.os, "geteuid", lambda: os.getuid() + 1)
    assert store.load(key) is None
    assert_same_arrays(store.get_or_create(key, build), build.arrays)
    assert build.calls == 2


def _create_key_at_once(root: str, barrier, results) -> None:
    barrier.wait()
    results.put(load_or_create_secret(Path(root)).hex())


def test_processes_creating_the_key_at_once_agree_on_one(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    for attempt in range(3):
        root = tmp_path / f"cache{attempt}"
        barrier = context.Barrier(4)
        results = context.Queue()
        workers = [
            context.Process(target=_create_key_at_once, args=(str(root), barrier, results))
            for _ in range(4)
        ]
        for worker in workers:
            worker.start()
        keys = {results.get(timeout=60) for _ in workers}
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
        assert keys == {(root / SECRET_FILENAME).read_bytes().hex()}
        assert not list(root.glob("*.tmp"))


def test_format_version_is_2_with_a_tag_after_the_payload(
    store: ArtifactStore, key: CacheKey
) -> None:
    path = store.save(key, {"x": np.zeros(2)})
    data = path.read_bytes()
    magic, version, meta_length, payload_length, _ = store_module._PREFIX.unpack_from(data)
    assert (magic, version) == (store_module.MAGIC, 2)
    assert len(data) == store_module._PREFIX.size + meta_length + payload_length + 32
