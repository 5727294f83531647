"""The run store keeps runs: folder locks, reserved run folders, honest status, robust listing, one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from core.locks import LOCK_FILE, FolderLock, LockHeld, lock_holder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- folder lock ------------------------------------------------------------------------------------------
def test_folder_lock_refuses_second_holder_and_names_it(tmp_path):
    with FolderLock(tmp_path / "a", purpose="train") as lock:
        assert lock.held and (tmp_path / "a" / LOCK_FILE).is_file()
        holder = lock_holder(tmp_path / "a")
        assert holder.pid == os.getpid() and holder.alive and holder.purpose == "train"
        with pytest.raises(LockHeld, match=rf"pid {os.getpid()} on {socket.gethostname()}"):
            FolderLock(tmp_path / "a").acquire()
    assert lock_holder(tmp_path / "a") is None  # released


def test_folder_lock_held_by_other_live_process(tmp_path):
    folder = tmp_path / "b"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (folder / LOCK_FILE).write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(),
                                                   "started": "now", "purpose": "train"}))
        assert FolderLock.holder(folder).alive is True
        with pytest.raises(LockHeld, match=rf"in use by pid {proc.pid} on {socket.gethostname()}.*wait"):
            FolderLock(folder).acquire()
    finally:
        proc.kill()
        proc.wait()
    assert FolderLock.holder(folder).alive is False  # the holder died: the lock is stale
    with FolderLock(folder, purpose="again") as lock:
        assert lock.took_over is not None and lock.took_over.pid == proc.pid
        assert lock_holder(folder).pid == os.getpid()


def test_stale_and_foreign_locks(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with FolderLock(folder):
        pass
    (folder / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    assert lock_holder(folder).alive is None
    with pytest.raises(LockHeld, match="another host.*delete"):
        FolderLock(folder).acquire()


# -- caches heal every time -------------------------------------------------------------------------------
def test_activation_cache_heals_twice_in_one_process(tiny_lm, tmp_path, monkeypatch):
    import numpy as np

    from core import activations as act

    def sub(name: str):
        path = tmp_path / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    monkeypatch.setattr(act, "cache_subdir", sub)
    calls = []
    monkeypatch.setattr(act, "_dataset_texts", lambda dataset, n, seed, source: calls.append(1) or ["a b c"] * n)
    first = act.dataset_activations(tiny_lm, "c4", [1], n=2, compute="native")
    for _ in range(2):  # the same process damages and heals the index database twice
        (tmp_path / "activations" / "cache.db").write_bytes(b"this is not sqlite" * 100)
        again = act.dataset_activations(tiny_lm, "c4", [1], n=2, compute="native")
        np.testing.assert_array_equal(first.layer(1), again.layer(1))
    assert len(calls) == 3 and len(list(tmp_path.glob("activations.damaged-*"))) == 2
