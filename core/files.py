"""Open files from disk without leaving the allowed directories, blocking, or reading without bound.

Every file the engine reads on a user's behalf (ImageFolder images, idx files, ``--image``) goes
through :func:`open_regular_file`, so the checks live in one place:

- **confinement**: with ``roots`` given, the path is resolved (every symlink followed) and must lie
  inside one of them; the file that was actually opened is checked again through its descriptor
  (``/proc/self/fd``), so swapping a path component for a symlink between the check and the open
  gains nothing. Messages name only the path as the caller gave it, never where a link leads;
- **only regular files**: a named pipe, device or socket is refused. ``stat`` before opening keeps
  us from opening a device at all (opening some has side effects); ``O_NONBLOCK`` makes the open of
  a FIFO swapped in after that check return at once instead of waiting for a writer, and ``fstat``
  on the descriptor then refuses it;
- **bounded reads**: :func:`read_regular_file` reads at most ``max_bytes + 1`` bytes.

:func:`printable` turns any path or name into text that every front end can show: file names on
POSIX are bytes, and Python hands undecodable bytes out as lone surrogates, which cannot be encoded
as UTF-8 (Streamlit, JSON and most terminals fail on them).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import BinaryIO

from core.errors import UnreadableFileError

_PROC_FD = Path("/proc/self/fd")
_KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def printable(text: str | PathLike[str]) -> str:
    """``text`` as valid, printable UTF-8: undecodable bytes and control characters escaped.

    A file name whose bytes are not UTF-8 (Latin-1 from an old archive, say) shows each such byte
    as ``\\xNN``; control characters (a newline in a name) show as ``\\n``, ``\\x1b``, ... . Two
    different names can map to the same text (``caf\\xe9`` the bytes, and a name that literally
    spells that), so callers that need unique names check for collisions.
    """
    raw = os.fsencode(os.fspath(text))
    decoded = raw.decode("utf-8", "backslashreplace")
    if decoded.isprintable():
        return decoded
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in decoded
    )


def is_inside(path: Path, roots: Sequence[Path]) -> bool:
    """Whether the already resolved ``path`` is one of ``roots`` (resolved) or below one."""
    return any(path == root or path.is_relative_to(root) for root in roots)


def resolve_roots(roots: Sequence[str | PathLike[str]]) -> tuple[Path, ...]:
    """The roots with every symlink resolved, as confinement checks compare them."""
    return tuple(Path(os.path.realpath(root)) for root in roots)


def describe_kind(mode: int) -> str:
    """What a non-regular file is, for a message ("a named pipe (FIFO)", ...)."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_regular_file(
    path: str | PathLike[str],
    *,
    roots: Sequence[Path] | None = None,
    shown: str | None = None,
) -> BinaryIO:
    """Open a regular file for reading, refusing anything else and, with ``roots``, anything outside.

    Args:
        path: the file, as the caller found it (possibly through symlinks).
        roots: resolved directories (see :func:`resolve_roots`) the file must lie in after every
            symlink is followed; ``None`` for no confinement.
        shown: how messages name the file (default: ``path`` made printable). Callers pass a path
            relative to the dataset so that nothing about the rest of the server is revealed.

    Returns:
        A binary file object positioned at the start; the caller closes it.

    Raises:
        UnreadableFileError: missing, a directory, not a regular file (FIFO, device, socket),
            outside the roots, or unreadable. Never blocks.
    """
    name = shown if shown is not None else printable(path)
    target = Path(path)
    if roots is not None:
        # realpath, not Path.resolve(strict=True): a dangling link must give "no file", not leak
        # an exception that names its target.
        target = Path(os.path.realpath(target))
        if not is_inside(target, roots):
            raise UnreadableFileError(
                f"{name} is a symbolic link that leads outside the allowed directories, so it was "
                "not read. Copy the file into the dataset instead of linking to it."
            )
    try:
        info = os.stat(target)
    except FileNotFoundError:
        raise UnreadableFileError(f"No file {name}. Check the path.") from None
    except OSError as exc:
        raise UnreadableFileError(f"{name} could not be read: {exc.strerror or exc}.") from None
    _check_regular(info.st_mode, name)

    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    if roots is not None:
        # ``target`` has no symlinks left; one appearing now is a race, and is not followed.
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(target, flags)
    except FileNotFoundError:
        raise UnreadableFileError(f"No file {name}. Check the path.") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnreadableFileError(
                f"{name} changed into a symbolic link while being opened, so it was not read."
            ) from None
        raise UnreadableFileError(f"{name} could not be read: {exc.strerror or exc}.") from None
    try:
        # What was opened, not what the path named a moment ago.
        _check_regular(os.fstat(descriptor).st_mode, name)
        if roots is not None:
            _check_opened_inside(descriptor, target, roots, name)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(descriptor)
        raise


def read_regular_file(
    path: str | PathLike[str],
    max_bytes: int,
    *,
    roots: Sequence[Path] | None = None,
    shown: str | None = None,
    too_large_hint: str = "",
) -> bytes:
    """The bytes of a regular file, opened by :func:`open_regular_file`, at most ``max_bytes``.

    Raises:
        UnreadableFileError: as :func:`open_regular_file`, or the file is larger than
            ``max_bytes`` (detected after reading ``max_bytes + 1`` bytes, never more).
    """
    name = shown if shown is not None else printable(path)
    with open_regular_file(path, roots=roots, shown=name) as stream:
        try:
            data = stream.read(max_bytes + 1)
        except OSError as exc:
            raise UnreadableFileError(f"{name} could not be read: {exc.strerror or exc}.") from None
    if len(data) > max_bytes:
        raise UnreadableFileError(
            f"{name} is larger than the {human_bytes(max_bytes)} limit.{too_large_hint}"
        )
    return data


def human_bytes(n: int) -> str:
    """1536 -> '2 KB', 10485760 -> '10.0 MB'."""
    if n < 1024:
        return f"{n} bytes"
    if n < 2**20:
        return f"{n / 1024:.0f} KB"
    if n < 2**30:
        return f"{n / 2**20:.1f} MB"
    return f"{n / 2**30:.1f} GB"


def _check_regular(mode: int, name: str) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise UnreadableFileError(f"{name} is a directory, not a file.")
    raise UnreadableFileError(
        f"{name} is {describe_kind(mode)}, not a regular file, and was refused without reading "
        "(reading it could wait forever). Replace it with an ordinary file."
    )


def _check_opened_inside(descriptor: int, target: Path, roots: Sequence[Path], name: str) -> None:
    try:
        opened = Path(os.readlink(_PROC_FD / str(descriptor)))
    except OSError:
        # No /proc (macOS, BSD, a container without it): fall back to checking that the resolved
        # path still names the very file we opened.
        opened_info = os.fstat(descriptor)
        try:
            now = os.stat(target)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (opened_info.st_dev, opened_info.st_ino):
            raise UnreadableFileError(
                f"{name} changed while being opened, so it was not read. Try again."
            ) from None
        return
    if not is_inside(opened, roots):
        raise UnreadableFileError(
            f"{name} leads outside the allowed directories (it changed while being opened), so "
            "it was not read."
        )
