"""Train: prompt-tune a soft or deep prompt from a prior (or the Prior-lab sample), live, in the background."""

import json

import altair as alt
import pandas as pd
import streamlit as st

import ui_state
from core import jobs
from core.data import dataset_label
from core.priors import PRIOR_NAMES
from core.run_folders import reserve_run_dir
from core.runs import history_long, metrics_table, scan_runs
from core.sweep import plan_trials
from core.tuning import TrainConfig

DEFAULTS = TrainConfig()  # the library's defaults (converging lr and stop rule), so page and CLI agree
JOB_KEY = "train_job"  # the running job's id; the job itself lives in core.jobs, outside the rerun path
SWEEP_KEY = "sweep_job"  # the same for a background sweep

st.title("Train")
st.caption("Brief prompt-tuning on the frozen model: the loss on answer tokens only, validation every few steps, "
           "snapshots of the prompt so its path can be drawn on the *Divergence* page.")
lm = ui_state.current_model()
dataset = ui_state.current_dataset()
if dataset == "c4":
    st.info("Web text has no answers to score: choose MATH or QA as the dataset in the sidebar.")
    st.stop()
st.caption(f"Model **{lm.name}** ({lm.precision}, {lm.device}); data: {dataset_label(dataset)}.")

sent = st.session_state.get("prior_sample")
left, right = st.columns(2)
with left:
    method = st.radio("Method", ["soft", "deep"], horizontal=True, key="train_method",
                      help="soft: vectors before the input embeddings; deep: also before the input of chosen layers")
    soft = method == "soft" or st.toggle(
        "Deep: train the token-level soft prompt too (the paper's method)", value=True, key="train_deep_soft",
        help="Off: deep vectors only. Nothing trained then enters below the first prompted layer, so that layer's "
             "input is computed once per example and cached, and each step runs only the prompted layers "
             "(about 4.5-6x faster per step for the last 3 of 30 layers; the same loss as the full forward).")
    # the sample is token-level vectors: it seeds the soft prompt, so it needs one
    use_sent = sent is not None and soft and st.toggle(f"Start from the Prior-lab sample ({sent['describe']})",
                                                       value=True, key="train_use_sent")
    prior = st.selectbox("Prior", PRIOR_NAMES, key="train_prior", disabled=use_sent,
                         help="Initial distribution of the prompt vectors (the Prior lab shows its options).")
    params_text = st.text_input("Prior options (JSON)", "{}", key="train_prior_params", disabled=use_sent,
                                help='e.g. {"sigma": 0.05} or {"source": "math", "layer": 30}')
    layers = st.multiselect("Layers (deep)", list(range(lm.num_layers)), default=list(range(lm.num_layers))[-3:],
                            key="train_layers", disabled=method != "deep",
                            help="Decoder layers that get their own prepended vectors; the paper used the last 3.")
with right:
    lr = st.number_input("Learning rate (constant after a short warm-up)", 1e-5, 1.0, DEFAULTS.lr, format="%g",
                         key="train_lr")
    steps = st.number_input("Step budget", 1, 5000, DEFAULTS.steps, key="train_steps",
                            help="The most steps the run may take; with the plateau stop on it usually ends sooner.")
    plateau = st.toggle("Stop at a plateau (converged)", value=True, key="train_plateau",
                        help=f"Stop once the best validation loss has not improved by more than "
                             f"{DEFAULTS.plateau_margin:.0%} over {DEFAULTS.plateau_patience} evaluations; the run "
                             "records whether it converged or hit the budget.")
    batch = st.number_input("Batch size", 1, 64, DEFAULTS.batch_size, key="train_batch")
    eval_n = st.number_input("Held-out examples for task metrics (0 skips)", 0, 500, DEFAULTS.eval_n,
                             key="train_eval_n")
    seed = st.number_input("Seed", 0, 10_000, 0, key="train_seed")

if st.button("Start training", type="primary", key="train_start"):
    try:
        params = ({k: v for k, v in sent["prior"].items() if k not in ("name", "dim")} if use_sent
                  else json.loads(params_text or "{}"))
        init = sent["tensor"] if use_sent else None
        config = TrainConfig(
            method=method, dataset=dataset, prior=sent["prior"].get("name", "sample") if use_sent else prior,
            prior_params=params, lr=float(lr), steps=int(steps),
            plateau_patience=DEFAULTS.plateau_patience if plateau else 0,
            batch_size=int(batch), eval_n=int(eval_n), seed=int(seed), layers=layers if method == "deep" else [],
            soft=soft, n_tokens=int(init.shape[0]) if init is not None else 20)
    except (ValueError, json.JSONDecodeError) as exc:
        st.error(f"Cannot start: {exc}")
        st.stop()
    out = reserve_run_dir(f"{method}-{dataset}-{config.prior}-s{config.seed}")
    st.session_state[JOB_KEY] = jobs.start_job(lm, config, out, init=init)


@st.fragment(run_every=1.5)
def job_panel() -> None:
    """Polls the background job: progress, live loss, cancel, then the results against the baselines."""
    job = ui_state.session_job(JOB_KEY, "Choose the settings and press *Start training*. Training runs in the "
                                        "background: other pages stay usable.")
    if job is None:
        return
    job_id = job.id
    snap = job.snapshot()
    if job.finished and st.session_state.get("train_job_listed") != job_id:
        st.session_state["train_job_listed"] = job_id
        st.rerun()  # once, the whole page: the run list below now holds the finished run
    st.progress(snap["step"] / max(snap["total"], 1),
                text=f"{snap['state']}: step {snap['step']} of {snap['total']}, "
                     f"{snap['tokens_per_s']:.0f} tokens/s, {snap['wall']:.0f} s")
    if not job.finished and st.button("Cancel (keeps a usable partial run)", key="train_cancel"):
        job.cancel()
    rows = history_long(snap["history"])
    if rows:
        chart = alt.Chart(pd.DataFrame(rows)).mark_line(point=True).encode(
            x=alt.X("step:Q", title="training step"),
            y=alt.Y("loss:Q", title="loss on answer tokens", scale=alt.Scale(zero=False)),
            color=alt.Color("kind:N", title="loss"),
            tooltip=["step", "kind", alt.Tooltip("loss", format=".4f")],
        ).properties(title="Training and validation loss", height=300)
        st.altair_chart(chart, width="stretch")
    if snap["error"]:
        st.error(f"Training failed: {snap['error']}")
    elif snap["state"] in ("cancelled", "diverged"):
        st.warning(snap["message"])
    if snap["state"] == "done":
        m = snap["metrics"]
        if m.get("initial_val_loss") is not None:
            kept = (f" The run keeps step {m['kept_step']}'s prompt, of the best validation loss "
                    f"({m['kept_val_loss']:.4f})." if "kept_step" in m else "")
            st.success(f"Validation loss {m['initial_val_loss']:.4f} -> {m['final_val_loss']:.4f} in "
                       f"{m['train_seconds']:.0f} s of training.{kept} Run saved in `{snap['out_dir']}`.")
        table = metrics_table(m)
        if table:
            st.dataframe(pd.DataFrame(table), hide_index=True, width="stretch")
            st.caption("Greedy generation on held-out examples; the text prompt is "
                       f"“{m['eval'].get('text', '')}”.")


job_panel()

st.subheader("Sweep: priors x seeds")
st.caption("The settings above for several priors and seeds, one run after another in the background on this "
           "model, recorded as one experiment: the *Runs* page then shows each prior's mean with its 95% CI.")
sweep_priors = st.multiselect("Priors", PRIOR_NAMES, default=["gaussian", "fitted"], key="sweep_priors")
n_seeds = st.number_input("Seeds per prior", 1, 10, 2, key="sweep_seeds")
if st.button("Start sweep", key="sweep_start", disabled=not sweep_priors):
    options = {"model": lm.name, "precision": lm.precision, "method": method, "dataset": dataset, "lr": float(lr),
               "steps": int(steps), "batch-size": int(batch), "eval-n": int(eval_n),
               "plateau-patience": DEFAULTS.plateau_patience if plateau else 0,
               **({"layers": layers, "soft": soft} if method == "deep" else {})}
    spec, trials = plan_trials(options, {"prior": sweep_priors, "seed": list(range(int(n_seeds)))})
    out = reserve_run_dir(f"sweep-{method}-{dataset}")
    st.session_state[SWEEP_KEY] = jobs.start_sweep_job(lm, out, trials, spec)
ui_state.sweep_panel(SWEEP_KEY)

st.subheader("Runs")
scan = scan_runs()  # every readable run, and a row naming the file and the problem for each unreadable one
infos = [r.row() for r in scan.runs] + [p.row() for p in scan.problems]
if scan.problems:
    st.warning(f"{len(scan.problems)} run folder(s) cannot be read (status unreadable): the note says why.")
if infos:
    st.dataframe(pd.DataFrame(infos), hide_index=True, width="stretch")
    st.caption("Compare them on the *Runs* page; `python -m core runs` lists them from a shell.")
else:
    st.caption("No runs yet.")
