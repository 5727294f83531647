"""Home: a teaching tour of the paper's findings on this model, then the model and the datasets."""

import pandas as pd
import streamlit as st
from streamlit.errors import StreamlitPageNotFoundError

import ui_state
from core import tour
from core.analysis.divergence import token_reference
from core.artifacts import ArtifactStore
from core.assets import provenance
from core.data import dataset_label, load_examples, load_report
from core.findings import numbers_line

VERDICT_ICON = {"agrees": "✅", "does not agree": "❌", "inconclusive": "⚪"}

st.title("Prior Lab")
st.caption("Embedding priors in prompt-tuning: where soft prompts start, where they end up, and whether they collapse.")
lm = ui_state.current_model()

st.markdown(
    """
**Prompt-tuning** keeps a language model frozen and trains only a few vectors (here 20) that are
prepended to the input, as if they were the embeddings of extra tokens. *Deep* prompt-tuning also
prepends trained vectors to the inputs of some later layers. Where those vectors start is the
**prior**; where training leaves them is the **posterior**.

**Embedding collapse** is the observation that trained prompt vectors often end up right next to
the model's own token embeddings, so a prompt reads almost like words. The paper behind this
dashboard asks whether that always happens, whether the prior decides it, and whether it matters
for quality. Below, each of its findings is checked on the loaded model.
"""
)

store = ArtifactStore()
usable, note = store.status(lm.fingerprint)
findings = (store.load_json("findings") or {}).get("findings", []) if usable else []
runs = store.load_table("runs") if usable else None
st.subheader("The paper's findings, measured here")
if not findings:
    st.info(f"{note} Each page below can also compute its view live.")
for f in findings:
    with st.container(border=True):
        st.markdown(f"{VERDICT_ICON.get(f['verdict'], '')} **{f['claim']}**")
        st.markdown(f"*Test:* {f.get('test', 'n/a')}.")
        st.markdown(f"*This model:* {f['measured']}.")
        st.caption(numbers_line(f))
        st.caption(f"Verdict: **{f['verdict']}**. {f.get('why', '')}. See page *{f['page']}*, chart *{f['chart']}*.")
if findings:
    st.caption("Each verdict is agrees, does not agree or inconclusive: its rule (test, margin, thresholds) is stored "
               "beside the numbers in artifacts/tables/findings.json. " + tour.seeds_line(runs) + " " + note)


def readout(run: str) -> str:
    # Memoised per model, run folder and its last save: the token reference decodes the whole vocabulary once.
    ref = ui_state.memo("tour_ref", lm.fingerprint, lambda: token_reference(lm), max_entries=1)
    path = store.runs_root / run
    stamp = (path / "run.json").stat().st_mtime if (path / "run.json").exists() else 0.0
    return ui_state.memo("tour_readout", f"{lm.fingerprint}:{path}:{stamp}",
                         lambda: tour.prompt_readout(lm, path, ref))


st.subheader("Does the prompt collapse?")
pair = tour.collapse_pair(runs)
if pair["pair"]:
    sides = (("collapses", pair["pair"]["collapses"]), ("does not collapse", pair["pair"]["does_not"]))
    for col, (label, side) in zip(st.columns(2), sides, strict=True):
        with col.container(border=True):
            st.markdown(f"#### Prior *{side['prior']}*: the prompt {label}")
            st.markdown("\n".join(f"- {line}" for line in tour.side_lines(side)))
            st.caption("Its trained prompt, each vector's nearest token (cosine):")
            st.code(readout(side["run"]["run"]), language=None, wrap_lines=True)  # tokens may hold markdown marks
else:
    st.info(pair["statement"][0].upper() + pair["statement"][1:])
st.caption(f"Rule: {pair['rule']} {pair['note']}")
try:
    st.page_link("pages/6_Divergence.py", label="The full picture, every run step by step against fresh prior draws: "
                 "the Divergence page", icon="📐")
except StreamlitPageNotFoundError:  # the page run on its own (AppTest) has no navigation to link into
    st.markdown("The full picture, every run step by step against fresh prior draws: the *Divergence* page.")

st.subheader("Loaded model")
summary = lm.summary()
cols = st.columns(4)
cols[0].metric("Model", summary["name"])
cols[1].metric("Layers x width", f"{summary['layers']} x {summary['width']}")
cols[2].metric("Parameters", f"{summary['parameters'] / 1e6:.1f} M")
cols[3].metric("Load time", f"{summary['load time (s)']:.1f} s")
st.dataframe(pd.DataFrame([summary]).T.rename(columns={0: "value"}).astype(str), width="stretch")

st.subheader("Datasets")
for dataset in ("c4", "squad", "math"):
    with st.expander(dataset_label(dataset), expanded=dataset == ui_state.current_dataset()):
        report = load_report(dataset)
        st.caption(" · ".join(f"{k.replace('_', ' ')}: {v}" for k, v in report.items()
                              if k not in ("dataset", "source", "label", "modules", "difficulties")))
        examples = load_examples(dataset, n=3, seed=0)
        rows = [{"prompt": ex.prompt[-600:], "target": ex.target} for ex in examples]
        st.dataframe(pd.DataFrame(rows), width="stretch", hide_index=True)

st.subheader("Assets and licences")
st.dataframe(
    pd.DataFrame(provenance())[["key", "package", "version", "licence", "stand_in_for", "present"]],
    width="stretch", hide_index=True,
)
