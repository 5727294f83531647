"""Runs: compare trained prompts across priors; check the paper's claims; prompt transfer across tasks."""

import altair as alt
import pandas as pd
import streamlit as st

import ui_state
from core.analysis import runs_compare as rc
from core.analysis import sweeps as sw
from core.artifacts import ArtifactStore
from core.runs import drift_rows, read_run_json, run_converged

NO_RUNS = ("No runs of this model yet. Train one on the *Train* page, or from a shell: "
           "`python -m core train --dataset math --method soft --prior gaussian --steps 40`; "
           "`python -m core precompute` builds the gallery of every prior with repeated seeds.")
SHOWN = ["run", "origin", "method", "dataset", "prior", "lr", "seed", "converged", "steps_done", "steps",
         "steps_to_loss", "target_loss", "final_val_loss", "metric", "metric_value", "metric_no_prompt",
         "init_collapsed_share", "collapsed_share", "median_nearest_cos_centered", "median_manifold_ratio",
         "mean_drift_l2", "drift_rel_init", "drift_rel_nn_gap"]


@st.cache_data(show_spinner="Reading runs and measuring their divergence ...", max_entries=16)
def run_table(fingerprint: str, paths: tuple[tuple[str, str, float], ...], target: float | None) -> pd.DataFrame:
    # fingerprint keys the cache by model; paths carry (origin, path, run.json mtime) so a run still training
    # is re-read when it saves; the stored table spares recomputing divergence of the gallery.
    from core.runs import run_info

    stored = ArtifactStore().load_table_for("runs", fingerprint)
    entries = [rc.RunEntry(run_info(p), origin) for origin, p, _ in paths]
    return rc.runs_table(ui_state.current_model(), entries, "auto" if target is None else target, stored=stored)


def cache_key(entries: list) -> tuple[tuple[str, str, float], ...]:
    """(origin, path, run.json mtime) per run: what `run_table` is keyed by."""
    return tuple((e.origin, str(e.path), (e.path / "run.json").stat().st_mtime) for e in entries)


st.title("Runs")
st.caption("Does the prior change the final quality, or only where the prompt ends up? Do priors far from the data "
           "take longer to reach the same loss? Does a prompt trained on one task help another?")
lm = ui_state.current_model()
mine = ui_state.model_runs_or_stop(lm, "compare", NO_RUNS)

labels = {e.label: e for e in mine}
chosen = st.multiselect("Runs", list(labels), default=list(labels), key="runs_chosen")
if not chosen:
    st.info("Choose at least one run.")
    st.stop()
auto = st.toggle("Target loss: per method and dataset, the loss every run reaches", value=True, key="runs_auto",
                 help="Steps to loss counts the first validation step at or below the target.")
target = None if auto else st.number_input("Target validation loss", min_value=0.0, value=1.0, step=0.05,
                                           key="runs_target")
table = run_table(lm.fingerprint, cache_key([labels[c] for c in chosen]), target)
st.dataframe(table[SHOWN], width="stretch", hide_index=True)
st.caption("Collapse and drift describe each run's soft prompt against the token embeddings (see *Divergence*). "
           "metric: the task metric on held-out examples with the prompt, beside the no-prompt baseline. "
           "converged: the plateau rule stopped the run (validation loss no longer improving); otherwise it used "
           "its whole budget of `steps` (or was cancelled, or diverged) and may still have been learning. "
           "drift_rel_init / drift_rel_nn_gap: the soft prompt's mean L2 drift over its initial norm and over the "
           "token nearest-neighbour gap (below 1: no vector moved as far as from one token to the next).")
deep_only = table[(table["method"] == "deep") & table["same_model"] & table["collapsed_share"].isna()]
if len(deep_only):
    st.caption(f"{len(deep_only)} deep run(s) trained deep vectors alone, with no token-level soft prompt "
               "(`--no-soft`): there is no soft prompt to compare with the token embeddings, so their collapse and "
               "drift cells are empty. The drift of each of their deep tensors is in the expander below.")

with st.expander("Drift of every prompt tensor of one run"):
    one = labels[st.selectbox("Run", chosen, key="runs_drift_run")]
    info = read_run_json(one.path)
    drift = pd.DataFrame(drift_rows(info.get("metrics", {})))
    st.caption(f"converged: {run_converged(info)} (stop: {info.get('stop_reason', 'not recorded')}). "
               f"Rule: {info.get('stop_rule', 'not recorded: this run trained a fixed number of steps')}.")
    if drift.empty:
        st.caption("This run recorded no drift (it was trained before drift was measured).")
    else:
        st.dataframe(drift, hide_index=True, width="stretch")

curves = rc.loss_curves([labels[c] for c in chosen])
kind = st.radio("Loss curves", ["validation", "train"], horizontal=True, key="runs_kind")
st.altair_chart(alt.Chart(curves[curves["kind"] == kind]).mark_line(point=kind == "validation").encode(
    x=alt.X("step", title="training step"), y=alt.Y("loss", title=f"{kind} loss", scale=alt.Scale(zero=False)),
    color=alt.Color("run", title="run"), tooltip=["run", "prior", "step", alt.Tooltip("loss", format=".4f")],
).properties(title=f"{kind.capitalize()} loss of each run", height=320).interactive(), width="stretch")

st.subheader("Sweeps: each prior over seeds, mean and 95% CI")
groups = sw.sweep_groups(mine)
if not groups:
    st.info("No sweep among these runs. `python -m core sweep --grid prior=gaussian,fitted --grid seed=0,1,2 "
            "--out runs/priors` runs one (README: *Beyond one machine*); the *Train* page starts a small one.")
else:
    members = groups[st.selectbox("Sweep", list(groups), key="runs_sweep")]
    summary = sw.sweep_summary(sw.with_status(run_table(lm.fingerprint, cache_key(members), target), members))
    measure = st.selectbox("Measure", list(summary["measure"].unique()), key="runs_sweep_measure")
    shown = summary[summary["measure"] == measure].assign(group=sw.group_label)
    base = alt.Chart(shown).encode(x=alt.X("prior:N", title="prior"), xOffset="group:N",
                                   color=alt.Color("group:N", title="setting"))
    tips = ["prior", "group", "n", "failed", alt.Tooltip("mean:Q", format=".4f"), "ci"]
    st.altair_chart((base.mark_errorbar(ticks=True).encode(
        y=alt.Y("ci_low:Q", title=measure.replace("_", " "), scale=alt.Scale(zero=False)), y2="ci_high:Q",
        tooltip=tips) + base.mark_point(filled=True, size=90).encode(y="mean:Q", tooltip=tips)).properties(
        title=f"{measure.replace('_', ' ')} per prior: mean over seeds with its 95% t-interval", height=320),
        width="stretch")
    st.dataframe(shown[["method", "dataset", "prior", "n", "failed", "mean", "ci"]], hide_index=True, width="stretch")
    st.caption("Only finished trials enter a mean (failed or diverged ones are counted apart). A prior with one "
               "seed has no interval: its CI is undefined and no bar is drawn. `python -m core sweeps --summary "
               "NAME` prints the same table.")

st.subheader("The paper's claims on this model")
measures = [m for m in ("eval_answer_loss", "final_val_loss", "best_val_loss", "metric_value")
            if m in table and pd.to_numeric(table[m], errors="coerce").notna().any()] or ["final_val_loss"]
value = st.selectbox("Quality measure", measures, key="runs_value",
                     help="eval_answer_loss: answer-token loss of the kept prompt on the held-out evaluation items "
                          "(not the validation set it was chosen on); metric_value: accuracy (MATH) or F1 (QA) on "
                          "the same items, where the run measured them.")
scored = table.assign(**{value: pd.to_numeric(table[value], errors="coerce")}).dropna(subset=[value])
if scored.empty:
    st.info(f"No chosen run has a {value}: runs trained with `--eval-n 0` measure no task metric.")
else:
    st.altair_chart(alt.Chart(scored).mark_point(filled=True, size=80).encode(
        x=alt.X("prior", title="prior"), y=alt.Y(value, title=value.replace("_", " "), scale=alt.Scale(zero=False)),
        color=alt.Color("dataset", title="dataset"), shape=alt.Shape("method", title="method"),
        tooltip=["run", "prior", "seed", alt.Tooltip(value, format=".4f")],
    ).properties(title=f"{value.replace('_', ' ')} per prior (one point per run)", height=300), width="stretch")
    st.dataframe(rc.prior_spread(scored, value), width="stretch", hide_index=True)
    st.markdown("**Does the final quality differ across priors?** " + rc.prior_significance(scored, value)["statement"])

speed_lines = [f"{method}/{dataset}: " + rc.divergence_vs_speed(group)["statement"]
               for (method, dataset), group in table.groupby(["method", "dataset"])]
st.altair_chart(alt.Chart(table.dropna(subset=["init_manifold_ratio", "steps_to_loss"])).mark_point(
    filled=True, size=80).encode(
    x=alt.X("init_manifold_ratio", title="initial distance to the token manifold (x median k-NN)"),
    y=alt.Y("steps_to_loss", title="steps to reach the target loss"), color=alt.Color("prior", title="prior"),
    shape=alt.Shape("dataset", title="dataset"),
    tooltip=["run", "prior", "seed", "steps_to_loss", alt.Tooltip("init_manifold_ratio", format=".2f")],
).properties(title="Do diverged priors take longer to reach the same loss?", height=300), width="stretch")
st.markdown("**Do diverged priors take longer?** " + " ".join(speed_lines))

st.subheader("Prompt transfer across tasks")
store = ArtifactStore()
usable, note = store.status(lm.fingerprint)
transfer = store.load_table("transfer") if usable else None
if transfer is None:
    st.session_state.setdefault("runs_transfer", None)
    if st.button("Score the chosen runs' prompts on MATH and QA (a few minutes on a CPU)", key="runs_transfer_go"):
        bar = st.progress(0.0, text="scoring prompts ...")
        st.session_state["runs_transfer"] = rc.transfer_matrix(
            lm, [labels[c].path for c in chosen], n=16, progress=lambda f: bar.progress(f, text="scoring prompts ..."))
    transfer = st.session_state["runs_transfer"]
if transfer is None:
    why = ("the precomputed artifacts hold none yet (`python -m core precompute --only transfer` builds it)"
           if usable else note)
    st.info(f"No transfer table yet: {why}. Or press the button above to score the chosen runs live.")
    st.stop()
st.altair_chart(alt.Chart(transfer).mark_rect().encode(
    x=alt.X("evaluated_on:N", title="evaluated on"), y=alt.Y("run:N", title="prompt trained in run"),
    color=alt.Color("gain:Q", title="loss gain vs no prompt", scale=alt.Scale(scheme="redblue", domainMid=0)),
    tooltip=["run", "trained_on", "prior", "evaluated_on", alt.Tooltip("loss", format=".3f"),
             alt.Tooltip("no_prompt_loss", format=".3f"), alt.Tooltip("gain", format=".3f")],
).properties(title="Transfer matrix: validation-loss gain of each prompt on each task", height=28 * len(
    transfer["run"].unique()) + 40), width="stretch")
pairs, stats = rc.distance_vs_transfer(transfer, base=store.root)
if len(pairs):
    st.altair_chart(alt.Chart(pairs).mark_point(filled=True, size=70).encode(
        x=alt.X("distance", title="Frobenius distance between the two soft prompts"),
        y=alt.Y("transfer", title="share of the task's own prompt gain recovered"),
        color=alt.Color("task", title="evaluated on"),
        tooltip=["prompt_of", "evaluated_with_task_of", "task", alt.Tooltip("distance", format=".2f"),
                 alt.Tooltip("transfer", format=".2f")],
    ).properties(title="Prompt distance against transfer", height=300), width="stretch")
st.markdown("**Do closer prompts transfer better?** " + stats["statement"])
