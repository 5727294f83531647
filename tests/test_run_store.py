"""The run store keeps runs: folder locks, reserved run folders, honest status, robust listing, one-line errors."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from core.__main__ import main as cli
from core.locks import LOCK_FILE, FolderLock, LockHeld, lock_holder
from core.models import ModelLoadError, load_model
from core.run_folders import RunFolderError, delete_run, reserve_run_dir
from core.runs import RUN_FILES, list_runs, load_run, run_info, scan_runs
from core.tuning import TrainConfig, train
from core.tuning import trainer as trainer_mod
from core.tuning.trainer import TrainResult, divergence, lr_factor


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


# -- run folders: one run each ----------------------------------------------------------------------------
EX = [SimpleNamespace(prompt=f"Question: What is {k} plus 1?\nAnswer:", target=f" {k + 1}", answers=[str(k + 1)],
                      meta={}) for k in range(20)]
DATA = (EX[:12], EX[12:16], EX[16:])


def _config(**kw) -> TrainConfig:
    base = dict(method="soft", dataset="math", steps=3, batch_size=4, val_every=1, snapshot_every=1, eval_n=0,
                n_val=4, compute="fp32", n_tokens=2, lr=1e-2)
    return TrainConfig(**{**base, **kw})


def _train(lm, out, **kw) -> TrainResult:
    opts = {k: kw.pop(k) for k in ("resume", "force", "init", "cancel") if k in kw}
    return train(lm, _config(**kw), out, examples=DATA, **opts)


def test_out_on_a_users_folder_is_refused_and_delete_keeps_their_files(tiny_lm, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "t.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"docs is not empty and holds no run \(t.txt\)"):
        _train(tiny_lm, docs)
    assert sorted(p.name for p in docs.iterdir()) == ["t.txt"]  # nothing written, not even the lock
    run = tmp_path / "run"
    _train(tiny_lm, run, steps=1)
    assert json.loads((run / "run.json").read_text())["files"] == list(RUN_FILES)
    (run / "t.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"holds files that are not the run's \(t.txt\); nothing deleted"):
        delete_run(run)
    assert (run / "t.txt").read_text() == "mine" and (run / "run.json").exists()
    assert cli(["runs", "--delete", str(run)]) == 2
    (run / "t.txt").unlink()
    assert sorted(delete_run(run)) == sorted(RUN_FILES) and not run.exists()


def test_existing_run_is_kept_unless_resume_or_force(tiny_lm, tmp_path):
    out = tmp_path / "a"
    _train(tiny_lm, out, steps=3)
    before = (out / "run.json").read_text()
    with pytest.raises(RunFolderError, match=r"already holds a run \(done, 3/3 steps.*--resume.*--force"):
        _train(tiny_lm, out, steps=1)
    assert (out / "run.json").read_text() == before  # the finished 3-step run is intact
    (out / "notes.md").write_text("mine")
    with pytest.raises(RunFolderError, match=r"also holds files that are not the run's \(notes.md\)"):
        _train(tiny_lm, out, steps=1, force=True)
    (out / "notes.md").unlink()
    replaced = _train(tiny_lm, out, steps=1, force=True)
    assert replaced.status == "done" and json.loads((out / "run.json").read_text())["steps_done"] == 1
    assert lock_holder(out) is None  # released after training


def test_resume_needs_a_checkpoint(tiny_lm, tmp_path):
    with pytest.raises(RunFolderError, match="cannot resume .*fresh: it holds no run and no checkpoint.pt"):
        _train(tiny_lm, tmp_path / "fresh", resume=True)
    assert not (tmp_path / "fresh").exists()  # the refused call leaves nothing behind
    out = tmp_path / "done"
    _train(tiny_lm, out, steps=1)
    (out / "checkpoint.pt").unlink()
    with pytest.raises(RunFolderError, match="cannot resume .*done: it has no checkpoint.pt"):
        _train(tiny_lm, out, steps=2, resume=True)


def test_a_finished_run_can_be_extended(tiny_lm, tmp_path):
    out = tmp_path / "ext"
    _train(tiny_lm, out, steps=2)
    with pytest.raises(ValueError, match="config differs in .*lr"):
        _train(tiny_lm, out, steps=4, lr=0.5, resume=True)
    with pytest.raises(ValueError, match="extended .*not shortened"):
        _train(tiny_lm, out, steps=1, resume=True)
    longer = _train(tiny_lm, out, steps=4, resume=True)
    data = json.loads((out / "run.json").read_text())
    assert longer.status == "done" and [h["step"] for h in data["history"]] == [0, 1, 2, 3, 4]
    assert data["extended"] == [{"at_step": 2, "steps_before": 2, "steps_after": 4}]
    assert data["config"]["steps"] == 4 and data["config"]["warmup_steps"] == 1  # warm-up kept from the start
    assert not torch.equal(load_run(out).snapshots["soft"][2], load_run(out).snapshots["soft"][4])  # it trained


def test_warmup_never_leaves_a_step_at_lr_zero(tiny_lm, tmp_path):
    for total, warmup in ((1, 1), (2, 1), (10, 1), (10, 3), (5, 0), (3, 5)):
        factors = [lr_factor(s, warmup, total) for s in range(total)]
        assert all(f > 0 for f in factors), (total, warmup, factors)
        assert max(factors) == (1.0 if warmup <= total else total / warmup)
    init = torch.randn(2, tiny_lm.hidden_size, generator=torch.Generator().manual_seed(0))
    one = _train(tiny_lm, tmp_path / "one", steps=1, init=init)
    assert one.status == "done" and not torch.equal(one.prompt["soft"], init)  # the only step trained


def test_divergence_is_marked_with_its_step(tiny_lm, tmp_path, monkeypatch):
    assert divergence(float("nan"), 2.0, "training") == "training loss is nan"
    assert "above 3 x the initial validation loss 2.09" in divergence(12.45, 2.09, "validation")
    assert divergence(5.0, 2.0, "validation") is None
    # The tiny random model's loss cannot grow (its norms cap it): lower the bar to reach the rule's code path.
    monkeypatch.setattr(trainer_mod, "DIVERGE_FACTOR", 0.5)
    result = _train(tiny_lm, tmp_path / "div", steps=5)
    data = json.loads((tmp_path / "div" / "run.json").read_text())
    assert result.status == data["status"] == "diverged" and data["steps_done"] == 1
    assert data["diverged"]["step"] == 1 and "above 0.5 x the initial validation loss" in data["diverged"]["reason"]
    info = run_info(tmp_path / "div")
    assert info.status == "diverged" and info.note.startswith("diverged at step 1")
    bad = torch.full((2, tiny_lm.hidden_size), float("inf"))
    nonfinite = _train(tiny_lm, tmp_path / "nan", init=bad)
    assert nonfinite.status == "diverged" and "non-finite" in run_info(tmp_path / "nan").note


def test_one_spiking_training_batch_does_not_stop_a_run(tiny_lm, tmp_path, monkeypatch):
    real_step = trainer_mod._Trainer.train_step

    def spiking(self):  # noqa: ANN001, ANN202 - step 2's batch loss as a transient spike, 100x any real loss
        loss = real_step(self)
        return 1000.0 if self.step == 2 else loss

    monkeypatch.setattr(trainer_mod._Trainer, "train_step", spiking)
    result = _train(tiny_lm, tmp_path / "spike", steps=4, val_every=2, plateau_patience=0)
    assert result.status == "done" and "diverged" not in json.loads((tmp_path / "spike" / "run.json").read_text())
    assert [h["train_loss"] for h in result.history][2] == 1000.0 and result.history[-1]["step"] == 4


def test_run_files_get_the_umask_permissions(tiny_lm, tmp_path):
    old = os.umask(0o022)
    try:
        _train(tiny_lm, tmp_path / "perm", steps=1)
    finally:
        os.umask(old)
    for name in RUN_FILES:
        assert stat.S_IMODE((tmp_path / "perm" / name).stat().st_mode) == 0o644, name


def test_reserved_folders_are_unique_in_the_same_second(tmp_path):
    made = {reserve_run_dir("soft-math-gaussian-s0", tmp_path) for _ in range(50)}
    assert len(made) == 50 and all(p.is_dir() and p.name.count("soft-math-gaussian-s0") == 1 for p in made)


# -- honest status ----------------------------------------------------------------------------------------
def test_running_without_a_live_lock_holder_is_interrupted(tiny_lm, tmp_path):
    out = tmp_path / "r"
    _train(tiny_lm, out, steps=1)
    data = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**data, "status": "running"}))
    assert run_info(out).status == "interrupted"  # no lock at all
    (out / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    info = run_info(out)
    assert info.status == "interrupted" and "is gone" in info.note and "--resume" in info.note
    with FolderLock(out):
        assert run_info(out).status == "running"  # a live holder: it is running


# -- listing survives bad files ---------------------------------------------------------------------------
BAD = {"list": ("[]", "expected an object"), "history": ('{"config": {}, "history": "abc"}', "'history' is str"),
       "loss": ('{"config": {}, "history": [{"step": 0, "train_loss": null, "val_loss": "x"}]}',
                "history[0].val_loss is 'x'"),
       "json": ("{not json", "not valid JSON"), "bytes": (b"\xff\xfe\x00", "not text")}


def test_listing_shows_every_unreadable_run_json(tiny_lm, tmp_path, capsys):
    _train(tiny_lm, tmp_path / "good", steps=1)
    _bad_runs(tmp_path)
    scan = scan_runs(tmp_path)
    assert [r.name for r in scan.runs] == ["good"] and [r.name for r in list_runs(tmp_path)] == ["good"]
    problems = {p.path.name: p for p in scan.problems}
    assert set(problems) == set(BAD)
    for name, (_, why) in BAD.items():
        assert why in problems[name].problem and problems[name].file == tmp_path / name / "run.json"
    assert cli(["runs", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 run(s)" in out and "5 unreadable" in out
    for name, (_, why) in BAD.items():
        line = next(x for x in out.splitlines() if x.startswith(f"{name} "))
        assert "unreadable" in line and str(tmp_path / name / "run.json") in line and why in line


# -- one-line CLI errors ----------------------------------------------------------------------------------
def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch, tiny_lm):
    assert cli(["train", "--lr", "-1", "--compute", "fp32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lr must be a positive number") and err.count("\n") == 1
    with pytest.raises(ValueError, match="lr must be a positive number"):
        cli(["--debug", "train", "--lr", "-1", "--compute", "fp32"])
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "t.txt").write_text("x")
    assert cli(["train", "--compute", "fp32", "--out", str(docs)]) == 2
    err = capsys.readouterr().err
    assert "is not empty and holds no run (t.txt)" in err and err.count("\n") == 1
    assert cli(["train", "--compute", "fp32", "--resume"]) == 2
    assert "--resume needs --out DIR" in capsys.readouterr().err
    import core.models

    monkeypatch.setattr(core.models, "load_model", lambda *a, **k: tiny_lm)
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": 3}')
    assert cli(["train", "--compute", "fp32", "--dataset", "squad", "--source", str(bad), "--steps", "1",
                "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and err.count("\n") == 1
    assert not (tmp_path / "q").exists()


def test_local_model_folder_without_config_json(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=rf"no config.json in {tmp_path / 'empty'}"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match=r"no config.json in missing-model \(the folder does not exist\)"):
        load_model("./missing-model")
    assert cli(["train", "--compute", "fp32", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith(f"error: no config.json in {tmp_path / 'empty'}")


# -- whole commands in their own processes (the tiny model stands in for the real one) -------------------
TINY_CLI = '''
import os, sys, time
from types import SimpleNamespace
import core.data, core.models
lm = core.models.tiny_llama()
core.models.load_model = lambda *a, **k: lm
EX = [SimpleNamespace(prompt=f"Question: What is {k} plus 1?\\nAnswer:", target=f" {k + 1}", answers=[str(k + 1)],
                      meta={}) for k in range(40)]
core.data.load_examples = lambda dataset, split="validation", n=None, **kw: (
    EX[:24] if split == "train" else EX[24:])[:n]
delay, gate = float(os.environ.get("STEP_DELAY", "0")), os.environ.get("GATE", "")
if delay or gate:  # slow steps, or steps that wait while the file GATE exists
    from core.tuning.trainer import _Trainer
    step = _Trainer.train_step
    def slow(self):
        while gate and os.path.exists(gate):
            time.sleep(0.05)
        time.sleep(delay)
        return step(self)
    _Trainer.train_step = slow
from core.__main__ import main
sys.exit(main(sys.argv[1:]))
'''
TRAIN = ["train", "--compute", "fp32", "--batch-size", "4", "--n-train", "24", "--n-val", "4", "--eval-n", "0",
         "--n-tokens", "2", "--val-every", "1", "--snapshot-every", "1", "--threads", "1",
         "--plateau-patience", "0"]  # these runs test stopping and resuming, so they train every step asked


@pytest.fixture
def tiny_cli(tmp_path):
    """Start `python -m core ARGS` on the tiny model in its own process; runs default to tmp_path/runs."""
    script = tmp_path / "tiny_cli.py"
    script.write_text(TINY_CLI)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def start(args: list[str], delay: float = 0.0, gate: str = "") -> subprocess.Popen:
        env = {**os.environ, "PRIOR_LAB_RUNS": str(tmp_path / "runs"), "STEP_DELAY": str(delay), "GATE": gate,
               "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
        return subprocess.Popen([sys.executable, str(script), *args], cwd=repo, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return start


def _wait_for_step(out, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if json.loads((out / "run.json").read_text()).get("steps_done", 0) >= step:
                return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"{out} did not reach step {step}")


def test_two_runs_started_together_without_out_both_complete(tiny_cli, tmp_path):
    procs = [tiny_cli([*TRAIN, "--steps", "2"]) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    infos = list_runs(tmp_path / "runs")
    assert len(infos) == 2 and {i.status for i in infos} == {"done"} and {i.steps_done for i in infos} == {2}
    assert len({i.path for i in infos}) == 2 and all("soft-math-gaussian-s0" in i.name for i in infos)


def test_two_runs_with_the_same_out_one_is_refused_naming_the_holder(tiny_cli, tmp_path):
    out, gate = tmp_path / "same", tmp_path / "gate"
    gate.touch()  # the first run waits before its first step while this file exists
    first = tiny_cli([*TRAIN, "--steps", "3", "--out", str(out)], gate=str(gate))
    _wait_for_step(out, 0, first)
    second = tiny_cli([*TRAIN, "--steps", "2", "--out", str(out)])
    _, err = second.communicate(timeout=300)
    assert second.returncode == 2 and f"is in use by pid {first.pid} on {socket.gethostname()}" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    gate.unlink()
    first.communicate(timeout=300)
    assert first.returncode == 0
    data = json.loads((out / "run.json").read_text())
    assert data["status"] == "done" and [h["step"] for h in data["history"]] == list(range(4))  # nothing lost


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_cancels_saves_and_says_how_to_resume(tiny_cli, tmp_path, sig):
    out = tmp_path / "sig"
    proc = tiny_cli([*TRAIN, "--steps", "30", "--out", str(out)], delay=0.3)
    _wait_for_step(out, 2, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig and "Traceback" not in stderr + stdout, stderr
    data = json.loads((out / "run.json").read_text())
    assert data["status"] == "cancelled" and run_info(out).status == "cancelled"
    line = next(x for x in stdout.splitlines() if "resume with:" in x)
    command = line.split("resume with: ")[1]
    assert command.startswith("python -m core train ") and command.endswith(f"--out {out} --resume")
    if sig == signal.SIGTERM:  # the saved run is the same whichever signal stopped it: one resume is enough
        return
    resumed = tiny_cli(shlex.split(command)[3:])  # the same command, on the tiny model
    resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and json.loads((out / "run.json").read_text())["steps_done"] == 30


def test_a_killed_run_shows_interrupted_and_resumes(tiny_cli, tmp_path, capsys):
    out = tmp_path / "killed"
    proc = tiny_cli([*TRAIN, "--steps", "8", "--out", str(out)], delay=0.3)
    _wait_for_step(out, 2, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # as the dead process left it
    assert run_info(out).status == "interrupted"
    assert cli(["runs", "--root", str(tmp_path)]) == 0
    assert "interrupted" in next(x for x in capsys.readouterr().out.splitlines() if x.startswith("killed "))
    resumed = tiny_cli([*TRAIN, "--steps", "8", "--out", str(out), "--resume"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    data = json.loads((out / "run.json").read_text())
    assert data["status"] == "done" and [h["step"] for h in data["history"]] == list(range(9))


# -- the pages list unreadable runs too ------------------------------------------------------------------
def _bad_runs(root) -> None:
    for name, (content, _) in BAD.items():
        (root / name).mkdir(parents=True)
        if isinstance(content, bytes):
            (root / name / "run.json").write_bytes(content)
        else:
            (root / name / "run.json").write_text(content)


def test_train_and_runs_pages_show_unreadable_runs(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    import core.paths
    from core.analysis import runs_compare

    pages = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pages")
    _bad_runs(tmp_path / "runs")
    monkeypatch.setattr(core.paths, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(runs_compare, "ORIGINS", {"yours": tmp_path / "runs", "precomputed": tmp_path / "none"})
    at = AppTest.from_file(os.path.join(pages, "5_Train.py"), default_timeout=120).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert set(table["name"]) == set(BAD) and set(table["status"]) == {"unreadable"}
    assert any("5 run folder(s) cannot be read" in w.value for w in at.warning)
    at = AppTest.from_file(os.path.join(pages, "8_Runs.py"), default_timeout=120).run()
    assert not at.exception
    assert any("5 run folder(s) cannot be read" in w.value for w in at.warning)
    problems = at.dataframe[0].value
    assert sorted(problems["file"]) == sorted(str(tmp_path / "runs" / n / "run.json") for n in BAD)
