"""Per-slide locks and the removal of what killed processes left in ``OUT``."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

from wsi_screen.batch._common import FAILED_DIR, LOCK_DIR, logger
from wsi_screen.output_layout import TEMP_RE

__all__ = ["SlideLock", "clean_stale", "clean_worklist_temps", "pid_alive"]


class SlideLock:
    """An exclusive ``fcntl.flock`` on ``OUT/.locks/<slide-id>.lock`` (released by the OS on death).

    Lock files are never deleted: deleting one while another process waits on it would let a third
    process lock a new file of the same name.
    """

    def __init__(self, out_root: str | os.PathLike[str], slide_id: str) -> None:
        self.path = Path(out_root) / LOCK_DIR / f"{slide_id}.lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(
        self, *, blocking: bool = True, stop: threading.Event | None = None, poll_s: float = 0.25
    ) -> bool:
        """Take the lock; without ``blocking`` return False at once if another process holds it.

        A blocking wait polls so that ``stop`` can end it (returns False).
        """
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking or (stop is not None and stop.is_set()):
                    os.close(fd)
                    return False
                time.sleep(poll_s)
                continue
            except BaseException:
                os.close(fd)
                raise
            break
        self._fd = fd
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> SlideLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one of another user counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out_root: Path, slide_id: str) -> list[Path]:
    """Remove temporary folders of ``slide_id`` left by killed runs; call only while holding its lock.

    ``.<id>.tmp-<pid>-<hex>`` of a process still alive on this host is kept (a ``wsi-screen run``
    that takes no lock may be writing it); ``.<id>.old-<hex>`` (an interrupted replacement) goes.
    """
    removed: list[Path] = []
    if not out_root.is_dir():
        return removed
    prefix = f".{slide_id}."
    for p in out_root.iterdir():
        if not p.name.startswith(prefix):
            continue
        m = TEMP_RE.match(p.name)
        if m is None or m.group("sid") != slide_id:
            continue
        pid = m.group("pid")
        if pid is not None and pid_alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        logger.info("removed %s, left by an interrupted run", p.name)
    return removed


def clean_worklist_temps(out_root: Path) -> None:
    """Remove the temporary worklist and failure-record files of processes no longer alive."""
    for p in out_root.glob(".*.tmp-*"):
        m = re.match(r"^\.(batch\.csv|batch\.json|index\.html)\.tmp-(\d+)-\d+$", p.name)
        if m and not pid_alive(int(m.group(2))):
            with contextlib.suppress(OSError):
                p.unlink()
    failed = out_root / FAILED_DIR
    if failed.is_dir():
        for p in failed.glob(".*.tmp-*"):
            m = re.match(r"^\..+\.tmp-(\d+)-\d+$", p.name)
            if m and not pid_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    p.unlink()
