"""Run folders: format, list, load, delete; the CLI commands; background jobs."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from core import jobs
from core.run_folders import delete_run
from core.runs import list_runs, load_run
from core.tuning import TrainConfig, train

EX = [SimpleNamespace(prompt=f"Question: What is {k} plus 1?\nAnswer:", target=f" {k + 1}", answers=[str(k + 1)],
                      meta={}) for k in range(20)]
DATA = (EX[:12], EX[12:16], EX[16:])


def _config(**kw) -> TrainConfig:
    base = dict(method="deep", dataset="math", steps=4, batch_size=4, val_every=2, snapshot_every=3, eval_n=0,
                n_val=4, compute="fp32", n_tokens=3, layers=[2, 3], lr=1e-2)
    return TrainConfig(**{**base, **kw})


def _init(lm) -> dict:
    gen = torch.Generator().manual_seed(1)
    return {k: torch.randn(3, lm.hidden_size, generator=gen) for k in ("soft", "deep.2", "deep.3")}


@pytest.fixture(scope="module")
def run_dir(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "deep-run"
    init = _init(tiny_lm)
    train(tiny_lm, _config(), out, init=init, examples=DATA)
    return out, init


def test_run_folder_format(run_dir, tiny_lm):
    out, init = run_dir
    data = json.loads((out / "run.json").read_text())
    assert set(data) >= {"config", "history", "metrics", "snapshot_steps"}
    config = data["config"]
    assert config["model_fingerprint"] == tiny_lm.fingerprint and config["method"] == "deep"
    assert config["layers"] == [2, 3] and config["seed"] == 0 and config["lr"] == 1e-2
    assert config["dataset"] == "math" and config["source"] == "auto" and config["init_given"]
    assert [h["step"] for h in data["history"]] == [0, 1, 2, 3, 4]
    assert all(set(h) == {"step", "train_loss", "val_loss"} for h in data["history"])
    assert [h["val_loss"] is not None for h in data["history"]] == [True, False, True, False, True]
    assert data["snapshot_steps"] == [0, 3, 4]
    prompt = load_file(str(out / "prompt.safetensors"))
    snaps = load_file(str(out / "snapshots.safetensors"))
    assert set(prompt) == set(snaps) == {"soft", "deep.2", "deep.3"}
    for key in prompt:
        assert tuple(prompt[key].shape) == (3, tiny_lm.hidden_size)
        assert tuple(snaps[key].shape) == (3, 3, tiny_lm.hidden_size)
        assert torch.equal(snaps[key][0], init[key])  # step 0 is the prior sample
        assert torch.equal(snaps[key][-1], prompt[key])
    assert data["metrics"]["initial_val_loss"] == data["history"][0]["val_loss"]


def test_list_and_load(run_dir):
    out, _ = run_dir
    infos = list_runs(out.parent)
    assert [i.path for i in infos] == [out]
    assert infos[0].method == "deep" and infos[0].steps_done == 4 and infos[0].status == "done"
    run = load_run(out)
    assert run.method == "deep" and len(run.val_curve()) == 3 and run.snapshot_steps == [0, 3, 4]


def test_delete_and_errors(tmp_path, tiny_lm):
    with pytest.raises(FileNotFoundError, match="is not a run folder"):
        load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing deleted"):
        delete_run(tmp_path)
    out = tmp_path / "gone"
    train(tiny_lm, _config(steps=1), out, init=_init(tiny_lm), examples=DATA)
    delete_run(out)
    assert not out.exists() and list_runs(tmp_path) == []


def test_cli_runs_lists_table(run_dir, capsys):
    from core.__main__ import main

    out, _ = run_dir
    assert main(["runs", "--root", str(out.parent)]) == 0
    text = capsys.readouterr().out
    assert "deep-run" in text and "final val loss" in text and "1 run(s)" in text


def test_cli_train_parses_prior_params():
    import argparse

    from core import cli_train

    parser = argparse.ArgumentParser()
    cli_train.add_arguments(parser)
    args = parser.parse_args(["--prior", "gaussian", "--prior-param", "sigma=0.05", "--prior-param", "source=tokens",
                              "--method", "deep", "--layers", "1", "2"])
    assert dict(args.prior_param) == {"sigma": 0.05, "source": "tokens"} and args.layers == [1, 2]
    with pytest.raises(SystemExit):
        parser.parse_args(["--prior-param", "novalue"])


def test_finished_run_keeps_its_best_validation_prompt_and_resumes_from_its_last(tiny_lm, tmp_path):
    # training answers " seven" to questions whose validation answer is " three": the validation loss first
    # falls (the answer's form) and then rises (the wrong word), the case early stopping is for
    def ask(k: int, answer: str) -> SimpleNamespace:
        return SimpleNamespace(prompt=f"Question: What is {k} plus 1?\nAnswer:", target=answer,
                               answers=[answer.strip()], meta={})

    data = ([ask(k, " seven") for k in range(12)], [ask(k, " three") for k in range(12, 16)], [])
    cfg = dict(method="soft", steps=12, val_every=1, snapshot_every=1, plateau_patience=0, lr=0.5, layers=[])
    init = _init(tiny_lm)["soft"]
    best = train(tiny_lm, _config(**cfg), tmp_path / "best", init=init, examples=data)
    vals = [h["val_loss"] for h in best.history]
    best_step = min(range(len(vals)), key=vals.__getitem__)
    assert 0 < best_step < 12, "precondition: the validation loss must be lowest between the first and last step"
    run = load_run(tmp_path / "best")
    assert run.info["kept"]["step"] == best_step and run.metrics["kept_val_loss"] == vals[best_step]
    assert f"kept the prompt of step {best_step}" in run.info["message"]
    torch.testing.assert_close(run.prompt["soft"], run.snapshots["soft"][best_step])
    torch.testing.assert_close(best.prompt["soft"], run.prompt["soft"])
    last = train(tiny_lm, _config(**cfg, keep="last"), tmp_path / "last", init=init, examples=data)
    torch.testing.assert_close(last.prompt["soft"], run.snapshots["soft"][-1])  # same training, the last prompt
    assert "kept" not in load_run(tmp_path / "last").info
    # extending the finished run trains on from its last step, exactly as a run planned longer from the start
    longer = train(tiny_lm, _config(**{**cfg, "steps": 14}), tmp_path / "best", examples=data, resume=True)
    straight = train(tiny_lm, _config(**{**cfg, "steps": 14}), tmp_path / "straight", init=init, examples=data)
    assert [h["val_loss"] for h in longer.history] == pytest.approx([h["val_loss"] for h in straight.history])


def test_job_runs_in_background_and_cancels(tiny_lm, tmp_path):
    job_id = jobs.start_job(tiny_lm, _config(steps=3), tmp_path / "job", init=_init(tiny_lm), examples=DATA)
    job = jobs.get_job(job_id)
    job.thread.join(timeout=120)
    snap = job.snapshot()
    assert snap["state"] == "done" and snap["step"] == 3 and len(snap["history"]) == 4
    cancelled = jobs.start_job(tiny_lm, _config(steps=500), tmp_path / "job2", init=_init(tiny_lm), examples=DATA)
    job2 = jobs.get_job(cancelled)
    deadline = time.time() + 60
    while job2.snapshot()["step"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    job2.cancel()
    job2.thread.join(timeout=120)
    assert job2.snapshot()["state"] == "cancelled"
    partial = load_run(tmp_path / "job2")
    assert partial.status == "cancelled" and 1 <= partial.history[-1]["step"] < 500 and partial.prompt
    with pytest.raises(KeyError, match="no training job"):
        jobs.get_job("job-nope")


def test_job_that_fails_before_training_leaves_no_empty_run_folder(tiny_lm, tmp_path):
    from core.run_folders import reserve_run_dir

    out = reserve_run_dir("deep-math-gaussian-s0", root=tmp_path)  # as the Train page does before starting
    job = jobs.get_job(jobs.start_job(tiny_lm, _config(layers=[2, 99]), out, examples=DATA))
    job.thread.join(timeout=120)
    snap = job.snapshot()
    assert snap["state"] == "failed" and "99" in snap["error"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.integration  # real data: the arithmetic generator
def test_cli_train_end_to_end_on_a_local_tiny_model(tiny_lm, tmp_path, capsys):
    from core.__main__ import main

    tiny_lm.model.save_pretrained(tmp_path / "tiny")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "cli-run"
    code = main(["train", "--model", str(tmp_path / "tiny"), "--dataset", "math", "--method", "soft", "--prior",
                 "gaussian", "--prior-param", "sigma=0.1", "--lr", "0.01", "--steps", "2", "--batch-size", "2",
                 "--n-train", "8", "--n-val", "4", "--eval-n", "2", "--val-every", "1", "--compute", "fp32",
                 "--n-tokens", "3", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "status: done" in text and "val loss:" in text and "no_prompt" in text
    run = load_run(out)
    assert run.config["prior_params"]["sigma"] == 0.1 and run.config["n_tokens"] == 3
    assert set(run.metrics["eval"]) >= {"prompt", "no_prompt", "text_prompt"}
    assert [h["step"] for h in run.history] == [0, 1, 2]
