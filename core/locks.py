"""A folder lock: one writer per folder (a run, a sweep), visible to everyone who looks.

    >>> with FolderLock("runs/demo", purpose="train"):
    ...     ...  # write into runs/demo; a second FolderLock on it raises LockHeld

The lock is a file `DIR/.lock` created with O_CREAT|O_EXCL (atomic on a local
disk) holding JSON {"pid", "host", "started", "purpose"}. A lock left by a
process that died on this host (os.kill(pid, 0) fails) is stale: the next
FolderLock takes it over. A lock held from another host is never taken over
(we cannot see whether that process lives); the error says how to clear it.
`lock_holder(DIR)` reads a lock without taking it, e.g. to tell a running run
from one whose process died; `check_free(DIR)` raises LockHeld if it is held.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = ".lock"


class LockHeld(RuntimeError):
    """Another live process holds the folder's lock."""


@dataclass
class Holder:
    """Who holds (or held) a folder's lock, read from its lock file."""

    pid: int | None
    host: str
    started: str
    purpose: str
    alive: bool | None  # True/False on this host; None when held from another host (unknown)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} ({self.purpose or 'unknown purpose'}, since {self.started or '?'})"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def _age(file: Path) -> float:
    try:
        return time.time() - file.stat().st_mtime
    except OSError:
        return float("inf")


def lock_holder(folder: str | Path) -> Holder | None:
    """The holder of `folder`'s lock without taking it; None when the folder has no lock file.

    A lock file that cannot be parsed (e.g. its writer died mid-write) reads as a dead holder.
    """
    return lock_holder_file(Path(folder) / LOCK_FILE)


def lock_holder_file(file: Path) -> Holder | None:
    """`lock_holder` for a lock file given by path."""
    try:
        data = json.loads(file.read_text())
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return Holder(pid=None, host="?", started="", purpose="unreadable lock file", alive=False)
    host = str(data.get("host", "?"))
    try:
        pid = int(data.get("pid"))
    except (TypeError, ValueError):
        pid = None
    if pid is None:
        alive: bool | None = False
    elif host == socket.gethostname():
        alive = _pid_alive(pid)
    else:
        alive = None
    return Holder(pid=pid, host=host, started=str(data.get("started", "")), purpose=str(data.get("purpose", "")),
                  alive=alive)


def _held_message(folder: Path, holder: Holder) -> str:
    if holder.pid == os.getpid() and holder.host == socket.gethostname():
        return (f"{folder} is already locked by this process, {holder.describe()}; one writer per folder: "
                "wait for it to finish or use another folder")
    where = "" if holder.alive else " (on another host: this one cannot tell whether it still runs)"
    return (f"{folder} is in use by {holder.describe()}{where}; wait for it to finish, choose another folder, "
            f"or, if that process is gone, delete {Path(folder) / LOCK_FILE}")


def check_free(folder: str | Path) -> None:
    """Raise LockHeld (naming the holder) if a live process, or one on another host, holds `folder`'s lock.

    A look without taking the lock, e.g. to refuse early before slow work; take a FolderLock to write.
    """
    holder = lock_holder(folder)
    if holder is not None and holder.alive is not False:
        raise LockHeld(_held_message(Path(folder), holder))


class FolderLock:
    """Hold `folder/.lock` for the duration of a `with` block (or between acquire() and release()).

    Raises LockHeld (naming the holder's pid and host) when a live process, or one on another host,
    holds it. Takes over a stale lock of a dead process on this host. Re-entrant within one object only.
    """

    def __init__(self, folder: str | Path, purpose: str = "") -> None:
        self.folder = Path(folder)
        self.file = self.folder / LOCK_FILE
        self.purpose = purpose
        self.held = False
        self.took_over: Holder | None = None  # the stale holder replaced, if any

    @staticmethod
    def holder(folder: str | Path) -> Holder | None:
        """Same as `lock_holder(folder)`."""
        return lock_holder(folder)

    def _create(self) -> bool:
        try:
            fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "purpose": self.purpose}, fh)
        return True

    def acquire(self) -> FolderLock:
        if self.held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(30):
            if self._create():
                self.held = True
                return self
            holder = lock_holder(self.folder)
            if holder is None:
                continue  # released between our two looks: try again
            if holder.pid is None and _age(self.file) < 2.0:
                time.sleep(0.1)  # its writer may be between creating the file and writing it
                continue
            if holder.alive is False:
                # Stale: move it aside under a name unique to us, so two takers cannot both win.
                aside = self.file.with_name(f"{LOCK_FILE}.stale-{os.getpid()}-{time.monotonic_ns()}")
                try:
                    os.rename(self.file, aside)
                except FileNotFoundError:
                    continue
                moved = lock_holder_file(aside)
                if moved is not None and (moved.pid, moved.started) != (holder.pid, holder.started):
                    # Another taker replaced the stale lock first and we moved its live lock: put it back.
                    try:
                        os.link(aside, self.file)
                    except FileExistsError:
                        pass
                os.unlink(aside)
                self.took_over = holder
                continue
            raise LockHeld(_held_message(self.folder, holder))
        raise LockHeld(f"could not lock {self.folder}: its lock file keeps changing; try again")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = lock_holder(self.folder)
        if holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname():
            try:
                self.file.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
