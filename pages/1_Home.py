"""Home: the loaded model, the datasets and where they come from."""

import pandas as pd
import streamlit as st

import ui_state
from core.assets import provenance
from core.data import dataset_label, load_examples

st.title("Prior Lab")
st.caption("Embedding priors in prompt-tuning: where soft prompts start, where they end up, and whether they collapse.")

lm = ui_state.current_model()
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
        examples = load_examples(dataset, n=3, seed=0)
        rows = [{"prompt": ex.prompt[-600:], "target": ex.target} for ex in examples]
        st.dataframe(pd.DataFrame(rows), width="stretch", hide_index=True)

st.subheader("Assets and licences")
st.dataframe(
    pd.DataFrame(provenance())[["key", "package", "version", "licence", "stand_in_for", "present"]],
    width="stretch", hide_index=True,
)
