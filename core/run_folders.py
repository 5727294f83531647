"""Run folders, one run each: reserve a new one, claim one for writing (locked), delete one.

A run folder belongs to one run. `reserve_run_dir` creates a new folder atomically, with a name unique
even for runs started in the same second. `claim_run_dir` locks a folder (`core.locks.FolderLock`) and
checks it may be written: a new or empty folder; an existing run only to resume it or, with force, to
replace it; never a folder holding files that are not a run's. A run lists the files it wrote in
run.json ("files"); `delete_run` removes only those, and refuses a folder holding anything else.

    >>> out = reserve_run_dir("soft-math-gaussian-s0")   # runs/20261123-104501-soft-math-gaussian-s0-3fa2
    >>> with claim_run_dir(out) as mode:                 # "new"; LockHeld if another process writes there
    ...     ...
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from core import paths
from core.locks import LOCK_FILE, FolderLock, check_free
from core.runs import CHECKPOINT_FILE, RUN_FILES, RUN_JSON, is_run, run_info


class RunFolderError(ValueError):
    """A folder cannot be used (or deleted) as a run folder as asked; the message says why and what to do."""


def _is_temp_of(name: str, own: set[str]) -> bool:
    """A leftover temporary file of `_atomic_write` (".{own name}.XXXX"), e.g. after the process was killed."""
    return name.startswith(".") and any(name.startswith(f".{o}.") for o in own)


def run_files(path: str | Path) -> list[str]:
    """The files the run in `path` wrote: run.json's "files" manifest (older runs: the standard run files)."""
    try:
        files = json.loads((Path(path) / RUN_JSON).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        files = None
    if not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
        files = list(RUN_FILES)
    return sorted({Path(f).name for f in files} | {RUN_JSON})


def foreign_files(path: str | Path) -> list[str]:
    """Entries of folder `path` that are not the run's own (its manifest, the lock, leftover temporary files)."""
    path = Path(path)
    if not path.is_dir():
        return []
    own = set(run_files(path)) if is_run(path) else set(RUN_FILES)
    return sorted(p.name for p in path.iterdir()
                  if p.name not in own and p.name != LOCK_FILE and not _is_temp_of(p.name, own))


def _describe_run(path: Path) -> str:
    try:
        info = run_info(path)
        return f"a run ({info.status}, {info.steps_done}/{info.steps} steps, {info.method} {info.dataset} {info.prior})"
    except (OSError, ValueError):
        return "a run (its run.json is unreadable)"


def check_run_dir(path: str | Path, *, resume: bool = False, force: bool = False) -> str:
    """May a run be written into `path`? Returns "new", "resume" or "replace"; raises RunFolderError if not.

    new      `path` does not exist or is empty (a reserved folder)
    resume   `path` holds a run with a checkpoint and `resume` is set
    replace  `path` holds a run and `force` is set (its own files will be removed, nothing else)
    A folder holding files that are not a run's is always refused, and one whose lock a live process holds
    (core.locks.LockHeld, naming it). Reads only: `claim_run_dir` acts on it.
    """
    check_free(path)  # another live writer: LockHeld names it
    return _check_contents(Path(path), resume=resume, force=force)


def _check_contents(path: Path, *, resume: bool, force: bool) -> str:
    if resume and force:
        raise RunFolderError("--resume continues a run and --force replaces it: give one of them")
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"--out {path} is a file, not a folder; choose a folder for the run")
    entries = [p.name for p in path.iterdir() if p.name != LOCK_FILE] if path.is_dir() else []
    if not is_run(path):
        if entries:
            extra = foreign_files(path)
            shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
            raise RunFolderError(f"--out {path} is not empty and holds no run ({shown}); a run folder belongs to one "
                                 "run: choose a new or empty folder, or leave out --out for a fresh one under runs/")
        if resume:
            raise RunFolderError(f"cannot resume {path}: it holds no run and no {CHECKPOINT_FILE}; "
                                 "leave out --resume to start a new run there")
        return "new"
    if resume:
        if not (path / CHECKPOINT_FILE).is_file():
            raise RunFolderError(f"cannot resume {path}: it has no {CHECKPOINT_FILE} (the run finished and its "
                                 "resume state was removed, or it never saved one); start a new run with another "
                                 "--out, or replace this one with --force")
        return "resume"
    if force:
        extra = foreign_files(path)
        if extra:
            raise RunFolderError(f"--force would replace the run in {path}, but the folder also holds files that are "
                                 f"not the run's ({', '.join(extra)}); move them away first")
        return "replace"
    raise RunFolderError(f"--out {path} already holds {_describe_run(path)}; pass --resume to continue it, "
                         "--force to replace it, or choose another --out")


def _remove_run_files(path: Path) -> None:
    own = set(run_files(path))
    for p in path.iterdir():
        if p.name != LOCK_FILE and (p.name in own or _is_temp_of(p.name, own)) and p.is_file():
            p.unlink()
    (path / RUN_JSON).unlink(missing_ok=True)


@contextlib.contextmanager
def claim_run_dir(path: str | Path, *, resume: bool = False, force: bool = False,
                  purpose: str = "train") -> Iterator[str]:
    """Lock run folder `path` for writing and yield what to do: "new", "resume" (continue) or "replace".

    Holds `core.locks.FolderLock` (raises `LockHeld` naming the holder when another live process writes
    there) and checks the folder with `check_run_dir` under the lock; with "replace", the old run's own files
    are already removed. A folder this call created is removed again if it is still empty at the end.

        >>> with claim_run_dir("runs/a", resume=True) as mode:
        ...     ...  # train into runs/a
    """
    path = Path(path)
    created = not path.exists()
    lock = FolderLock(path, purpose=purpose)
    lock.acquire()
    try:
        mode = _check_contents(path, resume=resume, force=force)
        if mode == "replace":
            _remove_run_files(path)
    except BaseException:
        lock.release()
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    try:
        yield mode
    finally:
        lock.release()
        if created:  # a folder made for a run that failed before writing anything is not left behind
            with contextlib.suppress(OSError):
                path.rmdir()


def delete_run(path: str | Path) -> list[str]:
    """Delete the run in folder `path`: the files its manifest lists, then the folder. Returns the names deleted.

    Refuses (RunFolderError) a folder holding anything the run did not write, naming those files, and a run
    that a live process is still writing.
    """
    path = Path(path)
    if not is_run(path):
        raise FileNotFoundError(f"{path} is not a run folder (no {RUN_JSON}); nothing deleted")
    extra = foreign_files(path)
    if extra:
        raise RunFolderError(f"{path} holds files that are not the run's ({', '.join(extra)}); nothing deleted. "
                             "Move them away and delete again, or delete the folder yourself")
    with FolderLock(path, purpose="delete"):
        own = set(run_files(path))
        deleted = sorted(p.name for p in path.iterdir()
                         if p.name != LOCK_FILE and (p.name in own or _is_temp_of(p.name, own)))
        _remove_run_files(path)
    with contextlib.suppress(OSError):
        path.rmdir()
    return deleted


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80] or "run"


def reserve_run_dir(config_name: str, root: str | Path | None = None) -> Path:
    """Create and return a new, empty run folder under `root` (default RUNS_DIR), atomically.

    Named `{YYYYmmdd-HHMMSS}-{config_name}-{4 hex}`: the time, what the run is (e.g. "soft-math-gaussian-s0")
    and a random tag, so runs started in the same second get different folders; os.mkdir without exist_ok
    makes a clash impossible (a taken name is skipped).
    """
    root = Path(root if root is not None else paths.RUNS_DIR)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for _ in range(100):
        path = root / f"{stamp}-{_slug(config_name)}-{secrets.token_hex(2)}"
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise RunFolderError(f"could not reserve a new run folder under {root}: 100 names were taken")
