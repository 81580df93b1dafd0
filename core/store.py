"""On-disk artifact cache: named numpy arrays keyed by what they were computed from.

Features, kernel matrices and fitted parameters are slow to compute and cheap to keep. An artifact is
stored under a name derived from its :class:`CacheKey` (a kind such as ``"features"`` plus a mapping of
strings and numbers: dataset content hash, backbone name, preprocessing version, ...). Anything that
changes the result must be in the key; then a stale artifact is simply never looked up.

A cached file is never trusted. Each file is::

    prefix  struct "<8sIIQ32s": magic, FORMAT_VERSION, meta length, payload length,
            sha256(meta bytes + payload)
    meta    UTF-8 JSON: the key (kind and fields), array names/dtypes/shapes, caller's meta
    payload np.savez archive (uncompressed), read back with allow_pickle=False
    tag     32 bytes: HMAC-SHA256 of the prefix under this installation's secret key

The digest covers the meta as well as the payload, so a flipped byte anywhere is caught: in the prefix
by the magic/version/length checks or the digest, in the meta or payload by the digest, in the tag by
the tag. The digest only catches accidents, though: anyone who can write to the cache directory could
recompute it for a forged file and change the scores the app shows. The tag catches that: it
authenticates the prefix, and with it (through the digest) every byte of meta and payload, under a key
only this installation holds (see :func:`load_or_create_secret`: 32 random bytes in ``.hmac-key`` in
the cache directory, owner-only). A file that fails any check (or whose stored key is not the requested
one) is logged, removed and treated as a miss.

Writes are atomic (temporary file in the same directory, fsync, ``os.replace``), so readers see either the
old file or the complete new one. :meth:`ArtifactStore.get_or_create` holds an exclusive ``flock`` on a
per-key lock file around build + write and looks again after taking it, so when two processes ask for the
same missing key, one builds and the other reuses its result. If the cache directory cannot be written,
the store warns and builds without caching instead of failing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import io
import json
import logging
import math
import os
import re
import secrets
import stat
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import CacheError

try:  # fcntl is POSIX-only; without it we lose only the "build once" guarantee, not integrity.
    import fcntl
except ImportError:  # pragma: no cover - exercised only on Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: Bump when the file layout changes; files of another version are rebuilt, never parsed.
#: Version 2 added the authentication tag.
FORMAT_VERSION = 2
MAGIC = b"INFLXART"
SUFFIX = ".artifact"
ENV_CACHE_DIR = "INFLUENCE_CACHE_DIR"
SECRET_FILENAME = ".hmac-key"
"""The installation's cache key, in the cache directory: 32 random bytes, mode 0600."""

_PREFIX = struct.Struct("<8sIIQ32s")
_TAG_BYTES = 32
_SECRET_BYTES = 32
_TAG_CONTEXT = b"influence-explorer/artifact\0"
# Meta is small (key + array list); a larger length field means the prefix is damaged.
_MAX_META_BYTES = 1 << 20
_KIND_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")

KeyValue = str | int | float | bool


def default_cache_dir() -> Path:
    """The cache root: ``$INFLUENCE_CACHE_DIR`` if set, else ``~/.cache/influence-explorer``."""
    configured = os.environ.get(ENV_CACHE_DIR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "influence-explorer"


@dataclass(frozen=True)
class CacheKey:
    """What an artifact was computed from. Build with :meth:`CacheKey.of`.

    Two keys are equal exactly when their kind and fields are equal, and equal keys always give the
    same file name. Values are compared as JSON: ``1`` and ``1.0`` are different keys, so pass numbers
    consistently.

    Attributes:
        kind: Short lowercase label, the file-name prefix (``"features"``, ``"kernel"``).
        items: The fields as sorted ``(name, value)`` pairs.
    """

    kind: str
    items: tuple[tuple[str, KeyValue], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not _KIND_PATTERN.match(self.kind):
            raise CacheError(
                f"CacheKey kind {self.kind!r} must be 1-64 characters of a-z, 0-9, '_', '-', '.', "
                "starting with a letter or digit (it becomes part of a file name)"
            )
        names = [name for name, _ in self.items]
        if names != sorted(set(names)):
            raise CacheError(
                f"CacheKey items must be sorted with unique names, got {names}; use CacheKey.of"
            )
        for name, value in self.items:
            if not isinstance(name, str):
                raise CacheError(f"CacheKey field names must be strings, got {name!r}")
            # bool is an int subclass, and numpy scalars are neither; both handled explicitly.
            if not isinstance(value, (str, int, float, bool)):
                raise CacheError(
                    f"CacheKey field {name!r} has value {value!r} of type {type(value).__name__}; "
                    "only str, int, float and bool are allowed (convert numpy scalars with .item())"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise CacheError(f"CacheKey field {name!r} is {value}; key values must be finite")

    @classmethod
    def of(cls, kind: str, fields: Mapping[str, KeyValue]) -> CacheKey:
        """Key of ``kind`` from a mapping of field names to strings/numbers."""
        return cls(kind, tuple(sorted(fields.items())))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored inside the file so a load can check it got the right artifact."""
        return {"kind": self.kind, "fields": dict(self.items)}

    @property
    def digest(self) -> str:
        """sha256 (hex) of the canonical JSON form; stable across processes and Python versions."""
        canonical = json.dumps(
            self.as_dict(),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
        )
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    @property
    def filename(self) -> str:
        """``<kind>-<sha256>.artifact``: readable in ``ls``, unique by content."""
        return f"{self.kind}-{self.digest}{SUFFIX}"


@dataclass(frozen=True)
class CachedArtifact:
    """An artifact read back from the store.

    Attributes:
        arrays: The named arrays, as saved.
        meta: The caller's meta dict given to :meth:`ArtifactStore.save` (empty if none).
        created: Unix time the file was written.
    """

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0


def _read_file(path: Path) -> bytes:
    # A separate function so tests can simulate the file vanishing between lookup and read.
    with open(path, "rb") as handle:
        return handle.read()


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(arrays, Mapping):
        raise CacheError(
            f"an artifact must be a dict of name -> numpy array, got {type(arrays).__name__}"
        )
    checked: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise CacheError(f"artifact array name {name!r} must be a Python identifier")
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise CacheError(
                f"artifact array {name!r} has dtype {array.dtype}; object arrays would need pickle, "
                "which the store never uses. Store numeric or fixed-width string arrays."
            )
        checked[name] = array
    return checked


def encode_artifact(
    key: CacheKey,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any] | None = None,
    *,
    secret: bytes | None = None,
) -> bytes:
    """Serialise an artifact to the store's file format (see the module docstring).

    Args:
        key: The key the artifact is stored under; it is embedded and checked on load.
        arrays: Named arrays (any shape; numeric, bool or fixed-width string dtypes).
        meta: Optional JSON-serialisable information kept with the artifact.
        secret: The installation's key (:func:`load_or_create_secret`). Without it the tag is
            zeros, which no store accepts: such files are for tests and inspection only.

    Returns:
        The complete file contents.
    """
    checked = _check_arrays(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **checked)
    payload = buffer.getvalue()
    document = {
        "key": key.as_dict(),
        "created": time.time(),
        "arrays": {name: [a.dtype.str, list(a.shape)] for name, a in checked.items()},
        "meta": dict(meta or {}),
    }
    try:
        meta_bytes = json.dumps(document, sort_keys=True, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as error:
        raise CacheError(f"artifact meta must be JSON-serialisable: {error}") from error
    digest = hashlib.sha256(meta_bytes + payload).digest()
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(meta_bytes), len(payload), digest)
    tag = _tag(secret, prefix) if secret is not None else bytes(_TAG_BYTES)
    return prefix + meta_bytes + payload + tag


def decode_artifact(data: bytes, key: CacheKey, *, secret: bytes | None = None) -> CachedArtifact:
    """Parse and verify file contents written by :func:`encode_artifact`.

    Args:
        data: The file's contents.
        key: The key the caller asked for; a file holding another is refused.
        secret: The installation's key: the tag must verify under it. ``None`` checks everything
            but the tag, which proves only that the file is intact, not who wrote it; the store
            always passes its key.

    Raises:
        CacheError: Wrong magic, other format version, wrong length, digest mismatch, a tag that does
            not verify, a different key, or a payload numpy cannot read without pickle. The message
            says which.
    """
    if len(data) < _PREFIX.size:
        raise CacheError(f"file is {len(data)} bytes, shorter than the {_PREFIX.size}-byte header")
    magic, version, meta_length, payload_length, digest = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CacheError(f"bad magic {magic!r} (expected {MAGIC!r}): not an artifact file")
    if version != FORMAT_VERSION:
        raise CacheError(f"format version {version}, this code reads version {FORMAT_VERSION}")
    if meta_length > _MAX_META_BYTES:
        raise CacheError(f"meta length {meta_length} is implausible; header damaged")
    expected = _PREFIX.size + meta_length + payload_length + _TAG_BYTES
    if len(data) != expected:
        raise CacheError(f"file is {len(data)} bytes, header says {expected} (truncated or padded)")
    body = memoryview(data)[_PREFIX.size : expected - _TAG_BYTES]
    if hashlib.sha256(body).digest() != digest:
        raise CacheError("sha256 of meta + payload does not match the header; contents damaged")
    # Checked before the meta or payload is parsed: nothing unauthenticated reaches a parser.
    if secret is not None and not hmac.compare_digest(
        bytes(data[expected - _TAG_BYTES :]), _tag(secret, bytes(data[: _PREFIX.size]))
    ):
        raise CacheError(
            "its authentication tag (HMAC-SHA256) does not verify: it was not written with this "
            "installation's cache key, or was altered after writing"
        )
    try:
        document = json.loads(bytes(body[:meta_length]).decode("utf-8"))
        stored_key = document["key"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise CacheError(f"meta is not valid JSON with a key: {error}") from error
    if stored_key != key.as_dict():
        raise CacheError(f"file holds key {stored_key}, not the requested {key.as_dict()}")
    try:
        with np.load(io.BytesIO(bytes(body[meta_length:])), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise CacheError(f"payload is not a readable npz archive: {error}") from error
    return CachedArtifact(
        arrays=arrays, meta=dict(document.get("meta") or {}), created=document.get("created", 0.0)
    )


def _tag(secret: bytes, prefix: bytes) -> bytes:
    # The prefix holds sha256(meta + payload), so authenticating it authenticates every byte; one
    # HMAC over 92 bytes instead of a second pass over a payload of hundreds of MB.
    return hmac.new(secret, _TAG_CONTEXT + prefix, hashlib.sha256).digest()


class _UnusableSecret(OSError):
    """The key file exists but must not be used (see its message)."""


def load_or_create_secret(directory: Path) -> bytes:
    """The installation's cache key in ``directory``, created on first use.

    The key is :data:`SECRET_FILENAME`: 32 random bytes, a regular file owned by this user with
    mode 0600. It is created atomically: written in full to a private temporary file, then
    hard-linked to its name, which fails if another process got there first; that process's key is
    then read and used, so two processes starting at once agree on one key and nobody ever reads
    a half-written one. A key file that is not owner-only, not ours, not a regular file or not 32
    bytes is replaced by a new key with a warning (anyone who could read it could forge
    artifacts; those written under it are then rebuilt).

    Raises:
        OSError: the directory cannot be created, or the key neither read nor written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SECRET_FILENAME
    for _ in range(3):
        try:
            return _read_secret(path)
        except FileNotFoundError:
            _create_secret(path, replace=False)
        except _UnusableSecret as problem:
            logger.warning(
                "cache: %s %s; replacing it with a new key (artifacts written under the old one "
                "will be rebuilt)",
                path,
                problem,
            )
            _create_secret(path, replace=True)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for attempt in range(20):
        try:
            descriptor = os.open(path, flags)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise _UnusableSecret("is a symbolic link") from None
            raise
        try:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                raise _UnusableSecret("is not a regular file")
            if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
                raise _UnusableSecret(f"belongs to another user (uid {info.st_uid})")
            if info.st_mode & 0o077:
                raise _UnusableSecret(
                    f"has permissions {stat.S_IMODE(info.st_mode):04o}, readable or writable by "
                    "others (it must be 0600)"
                )
            secret = os.read(descriptor, _SECRET_BYTES + 1)
        finally:
            os.close(descriptor)
        if len(secret) == _SECRET_BYTES:
            return secret
        if attempt < 19 and not secret:
            # Only the fallback creation (no hard links) writes in place: give its writer a moment.
            time.sleep(0.05)
            continue
        raise _UnusableSecret(f"holds {len(secret)} bytes instead of {_SECRET_BYTES}")
    raise _UnusableSecret("stayed empty")  # pragma: no cover - the loop returns or raises


def _create_secret(path: Path, *, replace: bool) -> None:
    # mkstemp creates the file with mode 0600 whatever the umask.
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(_SECRET_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temp_name, path)
            return
        try:
            os.link(temp_name, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            _create_secret_in_place(path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)


def _create_secret_in_place(path: Path) -> None:
    """For file systems without hard links: O_EXCL creation, written right after."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(path, flags, 0o600)
    except FileExistsError:
        return
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(secrets.token_bytes(_SECRET_BYTES))
        handle.flush()
        os.fsync(handle.fileno())


class ArtifactStore:
    """A directory of artifacts, each a dict of named numpy arrays under a :class:`CacheKey`.

    Safe to share between threads and processes: writes are atomic, and :meth:`get_or_create`
    serialises builders of the same key with a file lock. Files are authenticated with the
    installation's key (:func:`load_or_create_secret`); it is read again for every load and save,
    so processes sharing the directory always agree on it.

    Args:
        root: Cache directory. Defaults to :func:`default_cache_dir`. Created on first write.
    """

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self._warned_unwritable = False

    def __repr__(self) -> str:
        return f"ArtifactStore(root={str(self.root)!r})"

    def path_for(self, key: CacheKey) -> Path:
        """Where the artifact for ``key`` lives (whether or not it exists)."""
        return self.root / key.filename

    def load_artifact(self, key: CacheKey) -> CachedArtifact | None:
        """Read and verify the artifact for ``key`` with its meta; ``None`` if absent or damaged.

        A damaged file is logged as a warning and removed, so the next write starts clean.
        """
        path = self.path_for(key)
        try:
            data = _read_file(path)
        except FileNotFoundError:
            # Also covers a file removed between a directory listing / exists() and this open.
            return None
        except OSError as error:
            logger.warning("cache: cannot read %s (%s); treating as a miss", path, error)
            return None
        try:
            secret = load_or_create_secret(self.root)
        except OSError as error:
            # Nothing can be verified without the key, so nothing is trusted.
            logger.warning("cache: no usable key in %s (%s); treating as a miss", self.root, error)
            return None
        try:
            return decode_artifact(data, key, secret=secret)
        except CacheError as error:
            logger.warning("cache: discarding damaged artifact %s: %s", path, error)
            self._remove(path)
            return None

    def load(self, key: CacheKey) -> dict[str, np.ndarray] | None:
        """The arrays stored under ``key``, or ``None`` if absent or damaged (then removed)."""
        artifact = self.load_artifact(key)
        return None if artifact is None else artifact.arrays

    def save(
        self,
        key: CacheKey,
        arrays: Mapping[str, np.ndarray],
        meta: Mapping[str, Any] | None = None,
    ) -> Path | None:
        """Write ``arrays`` under ``key`` atomically, replacing any previous file.

        Args:
            key: The artifact's key.
            arrays: Named arrays; object dtypes are refused (they would need pickle).
            meta: Optional JSON-serialisable information kept with the artifact.

        Returns:
            The file written, or ``None`` if the cache directory is not writable (logged once).

        Raises:
            CacheError: ``arrays`` or ``meta`` cannot be stored (a caller bug, not a disk problem).
        """
        # Encoded first, so a caller's bad arrays or meta raise even when the cache is unwritable.
        unsigned = encode_artifact(key, arrays, meta)
        path = self.path_for(key)
        try:
            secret = load_or_create_secret(self.root)
        except OSError as error:
            self._warn_unwritable(error)
            return None
        data = unsigned[:-_TAG_BYTES] + _tag(secret, unsigned[: _PREFIX.size])
        try:
            self._write_atomically(path, data)
        except OSError as error:
            self._warn_unwritable(error)
            return None
        return path

    def get_or_create(
        self,
        key: CacheKey,
        build: Callable[[], Mapping[str, np.ndarray]],
        meta: Mapping[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """The arrays under ``key``, building and saving them with ``build()`` on a miss.

        Concurrent callers in other processes (or threads) asking for the same key wait for the first
        builder and then read its file, so ``build`` runs once. If the directory is unwritable,
        ``build`` runs and its result is returned uncached.

        Args:
            key: The artifact's key.
            build: Computes the arrays; called at most once per call, only on a miss.
            meta: Stored with a newly built artifact.

        Returns:
            Name -> array, as stored (same dtypes and shapes as ``build`` returned).
        """
        cached = self.load(key)
        if cached is not None:
            return cached
        with self._exclusive(key):
            # Another process may have built it while we waited for the lock.
            cached = self.load(key)
            if cached is not None:
                return cached
            arrays = _check_arrays(build())
            self.save(key, arrays, meta)
            return arrays

    def discard(self, key: CacheKey) -> None:
        """Remove the artifact for ``key`` if present (e.g. when a caller finds it inconsistent)."""
        self._remove(self.path_for(key))

    # -- internals ---------------------------------------------------------------------------------

    def _write_atomically(self, path: Path, data: bytes) -> None:
        # Same directory as the target so os.replace is a rename on one file system, hence atomic.
        descriptor, temp_name = tempfile.mkstemp(
            dir=self.root, prefix=f".{path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp_name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp_name)
            raise
        # Persist the rename itself; best effort, some file systems refuse fsync on directories.
        with contextlib.suppress(OSError):
            directory = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    @contextlib.contextmanager
    def _exclusive(self, key: CacheKey) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover - non-POSIX
            yield
            return
        lock_path = self.root / f".{key.filename}.lock"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "a+b")  # noqa: SIM115 - closed in the finally below
        except OSError as error:
            # No lock without a writable directory; the build still runs, uncached.
            self._warn_unwritable(error)
            yield
            return
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            except OSError as error:
                # E.g. a network file system without lock support: integrity still holds (atomic
                # writes); only concurrent builders may duplicate work.
                logger.warning(
                    "cache: cannot lock %s (%s); building without a lock", lock_path, error
                )
            yield
        finally:
            # Lock files are left in place: deleting one another process has open would let a third
            # process lock a new inode and build concurrently. They are empty.
            handle.close()  # closing releases the flock

    def _remove(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            logger.warning("cache: could not remove %s: %s", path, error)

    def _warn_unwritable(self, error: OSError) -> None:
        if not self._warned_unwritable:
            logger.warning(
                "cache: directory %s is not writable (%s); results are computed but not cached. "
                "Set %s to a writable directory to cache them.",
                self.root,
                error,
                ENV_CACHE_DIR,
            )
            self._warned_unwritable = True
