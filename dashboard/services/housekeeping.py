"""What the server frees by itself: uploaded files nobody uses, and sessions that have ended.

What Streamlit 1.67 does on its own, read from its source (``streamlit/runtime``):

- Uploaded files live in memory (``MemoryUploadedFileManager.file_storage``, per session) from the
  upload request until the widget deletes them or the session shuts down. The upload endpoint
  (``PUT /_stcore/upload_file/<session>/<file>``) limits each file to ``server.maxUploadSize``
  but not how many files a session posts: with its own session's XSRF token a client can post
  file after file without attaching any to a widget, and every one is kept.
- A closed tab's session is kept for reconnection (``MemorySessionStorage``, a TTL cache of
  ``server.disconnectedSessionTTL`` = 120 s); when that expires the session is dropped from the
  cache **without being shut down**, so its uploaded files (and media references) are never
  removed: they stay for the life of the process.

So this module adds, per server process:

- :class:`UploadBounds`: at most :data:`UPLOADS_PER_SESSION` files per session (the newest; the
  dashboard decodes an upload on the script run that follows it and keeps only the decoded
  image), at most ``$INFLUENCE_UPLOAD_MEMORY`` (default :data:`DEFAULT_UPLOAD_MEMORY`) across all
  sessions (the oldest files go first), and none older than :data:`UPLOAD_MAX_AGE_S`. It wraps
  the manager's ``add_file``, so the bound holds as each file arrives, not at the next sweep.
- :class:`Janitor`, a thread that every :data:`TICK_S` seconds closes sessions disconnected for
  more than :data:`SESSION_GRACE_S` through Streamlit's thread-safe
  ``Runtime.clear_user_info_for_session`` (which shuts a stored session down: its files, media
  references, session state and script thread go), removes what is left of sessions Streamlit no
  longer knows, and hands freed memory back to the system: on the sweeps after a session ended
  or files were freed (:data:`RELEASE_SWEEPS` of them, since Streamlit closes a stored session
  on its event loop, after the sweep that asked), a full garbage collection (a closed session's
  objects hold each other in cycles, which only a full collection frees, and an idle server
  allocates too little to trigger one) and glibc's ``malloc_trim``. When it starts, it sets
  glibc to map blocks of a megabyte and more (``core.allocator.hand_back_large_buffers``): with
  glibc's moving thresholds such blocks came from heaps that kept them after the sessions that
  used them ended. When the last session has
  ended, the results kept for sessions to share (``st.cache_data``: explanations, heatmaps,
  downloads, experiment results) are dropped too; the fitted engines (``st.cache_resource``) and
  what the artifact store keeps on disk (verifications among it) stay.

What no app can bound is the number of sessions a client opens, or the bytes of requests in
flight: that is the reverse proxy's job (README, Robustness: ``limit_conn``, ``limit_req``,
``client_max_body_size``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from core.allocator import hand_back_large_buffers, release_freed_memory
from core.budget import parse_budget

_LOGGER = logging.getLogger(__name__)

#: Files kept per session (the newest); the dashboard's upload widget takes one file at a time.
UPLOADS_PER_SESSION = 2
#: Environment variable: bytes of uploaded files held across all sessions ("256M", "1G").
ENV_UPLOAD_MEMORY = "INFLUENCE_UPLOAD_MEMORY"
DEFAULT_UPLOAD_MEMORY = 256 * 2**20
#: An uploaded file is decoded on the script run right after it arrives; older ones are dropped.
UPLOAD_MAX_AGE_S = 600.0
#: A session disconnected this long is shut down (a reload or a network blip reconnects sooner).
SESSION_GRACE_S = 30.0
#: How often the janitor looks.
TICK_S = 2.0
#: Sweeps that collect garbage and trim the allocator after a session ended or files were freed.
RELEASE_SWEEPS = 3


def upload_memory_limit(environ: dict[str, str] | None = None) -> int:
    """``$INFLUENCE_UPLOAD_MEMORY`` in bytes, else :data:`DEFAULT_UPLOAD_MEMORY`.

    Raises:
        MemoryBudgetError: the variable is set to something that is not a size.
    """
    text = (os.environ if environ is None else environ).get(ENV_UPLOAD_MEMORY, "").strip()
    return parse_budget(text) if text else DEFAULT_UPLOAD_MEMORY


class UploadBounds:
    """Bounds on a ``MemoryUploadedFileManager``: files per session, bytes in all, age.

    Args:
        manager: Streamlit's uploaded-file manager (``Runtime.instance().uploaded_file_mgr``).
        per_session: newest files kept per session.
        total_bytes: bytes kept across sessions (the oldest files are removed first).
        max_age: seconds a file is kept.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        manager: Any,
        *,
        per_session: int = UPLOADS_PER_SESSION,
        total_bytes: int = DEFAULT_UPLOAD_MEMORY,
        max_age: float = UPLOAD_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.manager = manager
        self.per_session = int(per_session)
        self.total_bytes = int(total_bytes)
        self.max_age = float(max_age)
        self._clock = clock
        self._arrived: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self.removed = 0

    @staticmethod
    def supports(manager: Any) -> bool:
        """Whether the manager keeps files the way this class bounds (Streamlit's in-memory one)."""
        return isinstance(getattr(manager, "file_storage", None), dict) and all(
            callable(getattr(manager, name, None)) for name in ("add_file", "remove_file")
        )

    def install(self) -> bool:
        """Wrap the manager's ``add_file`` so that every new file is bounded as it arrives.

        Returns False (and changes nothing) for a manager this class does not support.
        """
        if not self.supports(self.manager):
            _LOGGER.warning(
                "Uploaded files are not bounded per session: unknown uploaded-file manager %r",
                type(self.manager).__name__,
            )
            return False
        if getattr(self.manager.add_file, "_bounded_by", None) is not None:
            return True
        original = self.manager.add_file

        def add_file(session_id: str, file: Any) -> None:
            original(session_id, file)
            self.added(session_id, getattr(file, "file_id", ""))

        add_file._bounded_by = self  # type: ignore[attr-defined]
        self.manager.add_file = add_file
        return True

    def _snapshot(self) -> dict[str, list[tuple[str, int]]]:
        """session -> [(file id, bytes)] in arrival order, read under the manager's lock."""
        lock = getattr(self.manager, "_lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            return {
                session: [
                    (file_id, len(getattr(rec, "data", b""))) for file_id, rec in files.items()
                ]
                for session, files in self.manager.file_storage.items()
            }

    def added(self, session_id: str, file_id: str) -> None:
        """A file arrived: enforce the per-session and total bounds now."""
        now = self._clock()
        with self._lock:
            self._arrived.setdefault((session_id, file_id), now)
        files = self._snapshot()
        victims = [(session_id, f) for f, _ in files.get(session_id, [])[: -self.per_session]]
        kept = {
            (session, f): size
            for session, entries in files.items()
            for f, size in entries
            if (session, f) not in victims
        }
        total = sum(kept.values())
        if total > self.total_bytes:
            with self._lock:
                oldest = sorted(kept, key=lambda key: self._arrived.get(key, now))
            for key in oldest:
                if total <= self.total_bytes or key == (session_id, file_id):
                    continue
                victims.append(key)
                total -= kept[key]
        self._remove(victims)

    def expire(self) -> int:
        """Remove files older than ``max_age`` and forget files removed by others; returns how
        many files this removed."""
        now = self._clock()
        present = {(s, f) for s, entries in self._snapshot().items() for f, _ in entries}
        with self._lock:
            for key in set(self._arrived) - present:
                del self._arrived[key]
            for key in present - set(self._arrived):
                self._arrived[key] = now  # arrived before the bounds were installed
            old = [key for key, t in self._arrived.items() if now - t > self.max_age]
        return self._remove(old)

    def forget_session(self, session_id: str) -> int:
        """Remove every file of a session; returns how many there were."""
        files = self._snapshot().get(session_id, [])
        return self._remove([(session_id, f) for f, _ in files])

    def _remove(self, keys: list[tuple[str, str]]) -> int:
        for session, file_id in keys:
            self.manager.remove_file(session, file_id)
            with self._lock:
                self._arrived.pop((session, file_id), None)
        self.removed += len(keys)
        return len(keys)

    def held_bytes(self) -> int:
        return sum(size for entries in self._snapshot().values() for _, size in entries)


class Janitor:
    """Closes sessions that have ended and frees what they held; see the module docstring.

    Args:
        runtime: Streamlit's ``Runtime`` (anything with ``is_active_session``,
            ``clear_user_info_for_session``, ``media_file_mgr``).
        bounds: the upload bounds (their ``expire`` runs every tick).
        grace: seconds a session may stay disconnected before it is shut down.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        runtime: Any,
        bounds: UploadBounds | None,
        *,
        grace: float = SESSION_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
        when_idle: Callable[[], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.bounds = bounds
        self.grace = float(grace)
        self._clock = clock
        self._lock = threading.Lock()
        self._last_active: dict[str, float] = {}
        self.closed = 0
        self._when_idle = when_idle
        self._release_sweeps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def seen(self, session_id: str) -> None:
        """A script run of ``session_id`` (so it is known, and active now)."""
        with self._lock:
            self._last_active[session_id] = self._clock()

    def tick(self) -> int:
        """One sweep; returns the number of sessions closed."""
        now = self._clock()
        known = set()
        if self.bounds is not None:
            known = set(self.bounds._snapshot())
        with self._lock:
            for session in known - set(self._last_active):
                self._last_active[session] = now
            sessions = dict(self._last_active)
        ended = []
        for session, last in sessions.items():
            if self.runtime.is_active_session(session):
                with self._lock:
                    self._last_active[session] = now
            elif now - last > self.grace:
                ended.append(session)
        freed = 0
        media = getattr(self.runtime, "media_file_mgr", None)
        for session in ended:
            # Shuts a disconnected (stored) session down on Streamlit's event loop: its files,
            # media references, session state and script thread go. Thread-safe by Streamlit's
            # contract; for a session already gone it does nothing, hence what follows.
            self.runtime.clear_user_info_for_session(session)
            if self.bounds is not None:
                freed += self.bounds.forget_session(session)
            if media is not None:
                media.clear_session_refs(session)
            with self._lock:
                self._last_active.pop(session, None)
        if ended and media is not None:
            media.remove_orphaned_files()
        if self.bounds is not None:
            freed += self.bounds.expire()
        self.closed += len(ended)
        if ended:
            with self._lock:
                idle = not self._last_active
            if idle and self._when_idle is not None:
                # The last session has ended: results kept for sessions to share (explanations,
                # heatmaps, downloads) have nobody to share them with; they go too.
                self._when_idle()
        if ended or freed:
            self._release_sweeps = RELEASE_SWEEPS
        if self._release_sweeps > 0:
            # This sweep and the next ones: the sessions asked to close above are closed on
            # Streamlit's event loop, so their memory is garbage only a little later.
            self._release_sweeps -= 1
            gc.collect()
            release_freed_memory()
        return len(ended)

    def start(self) -> Janitor:
        self._thread = threading.Thread(target=self._run, name="influence-janitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # a sweep that fails must not end the thread
                _LOGGER.exception("housekeeping sweep failed")


_STARTED: list[Janitor] = []
_START_LOCK = threading.Lock()


def janitor() -> Janitor | None:
    """The server process's janitor, started on first use (once per process: clearing
    Streamlit's caches does not start another); None outside a real server (AppTest runs the app
    against a mock runtime)."""
    from unittest.mock import Mock

    import streamlit as st
    from streamlit.runtime import Runtime

    if not Runtime.exists() or isinstance(Runtime.instance(), Mock):
        return None
    with _START_LOCK:
        if not _STARTED:
            hand_back_large_buffers()
            runtime = Runtime.instance()
            bounds = UploadBounds(runtime.uploaded_file_mgr, total_bytes=upload_memory_limit())
            keeper = Janitor(
                runtime, bounds if bounds.install() else None, when_idle=st.cache_data.clear
            )
            _STARTED.append(keeper.start())
        return _STARTED[0]


def keep_house() -> None:
    """Call once per script run (streamlit_app.py): starts the janitor and records the session."""
    keeper = janitor()
    if keeper is None:
        return
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    if ctx is not None:
        keeper.seen(ctx.session_id)
