"""Keeps the index fresh while files change. Events are hints, never trusted as complete: after a quiet
period they trigger an incremental index run (catalog rescan, then only changed files are re-read), so
bursts such as a branch switch, dropped events and renames all end in the same exact state. Ignored
top-level trees (build output, node_modules, .git) are not watched; if the system refuses watches
(inotify limits), polling takes over with a message.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileClosedNoWriteEvent, FileOpenedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from ds4.agent.index.catalog import list_files
from ds4.agent.index.indexer import IndexReport, index_repo

log = logging.getLogger("ds4.agent.index.watcher")
PRIVATE = (".git", ".ds4")  # our own database writes must not wake us


class _Hints(FileSystemEventHandler):
    def __init__(self, watcher: RepoWatcher):
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileOpenedEvent | FileClosedNoWriteEvent):
            return
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path and os.path.relpath(os.fsdecode(path), self.watcher.root).split(os.sep)[0] not in PRIVATE:
                self.watcher.hint()
                return


class RepoWatcher:
    def __init__(
        self,
        repo: str | Path,
        db_path: str | Path | None = None,
        debounce: float = 0.3,
        safety_rescan: float = 60.0,
        on_update: Callable[[IndexReport], None] | None = None,
        polling: bool = False,
    ):
        self.root = Path(repo).resolve()
        self.db_path, self.debounce, self.safety_rescan = db_path, debounce, safety_rescan
        self.on_update = on_update
        self.polling = polling
        self._last_hint = 0.0
        self._pending = threading.Event()
        self._stop = threading.Event()
        self._observer = None
        self._handler = _Hints(self)
        self._watched: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="ds4-index-watcher", daemon=True)
        self.updates = 0

    def start(self) -> None:
        self._observer = self._observe()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._pending.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
        self._thread.join(30)

    def hint(self) -> None:
        self._last_hint = time.monotonic()
        self._pending.set()

    def _observe(self):
        if not self.polling:
            try:
                observer = Observer()
                observer.schedule(self._handler, str(self.root), recursive=False)
                self._watch_tops(observer)
                observer.start()
                return observer
            except OSError as e:  # e.g. ENOSPC: the inotify watch limit
                log.warning("file watching is unavailable (%s); polling the repository instead", e)
                self._watched.clear()
        observer = PollingObserver(timeout=1.0)
        observer.schedule(self._handler, str(self.root), recursive=False)
        self._watch_tops(observer)
        observer.start()
        return observer

    def _watch_tops(self, observer) -> None:
        """Recursively watches each top-level folder that holds indexed files (ignored trees stay out)."""
        tops = {e.path.split("/", 1)[0] for e in list_files(self.root).files if "/" in e.path}
        for top in sorted(tops - set(PRIVATE) - self._watched):
            observer.schedule(self._handler, str(self.root / top), recursive=True)
            self._watched.add(top)

    def _run(self) -> None:
        while not self._stop.is_set():
            woke = self._pending.wait(timeout=self.safety_rescan)
            if self._stop.is_set():
                return
            if woke:
                while time.monotonic() - self._last_hint < self.debounce:  # wait for the burst to settle
                    time.sleep(self.debounce / 3)
                self._pending.clear()
            self._refresh()

    def _refresh(self) -> None:
        try:
            report = index_repo(self.root, self.db_path)
        except Exception:  # the watcher outlives a failed run (the next hint retries)
            log.exception("index update failed")
            return
        self.updates += 1
        try:
            self._watch_tops(self._observer)  # folders created since start
        except OSError as e:
            log.warning("cannot watch new folders (%s); the periodic rescan still covers them", e)
        if self.on_update is not None and (report.parsed or report.removed):
            self.on_update(report)
