"""Interpolation: C4, SQuAD and MATH activations at a layer with the MATH-C4 interpolation prior (paper Fig. 12)."""

from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

import ui_state
from core.analysis import runs_compare as rc
from core.artifacts import ArtifactStore
from core.data import dataset_label

NO_RUNS = ("No deep-prompt run of this model holds a prompt at this layer yet: the chart shows the data and the "
           "prior only. Train one with `python -m core train --dataset math --method deep --prior interpolation "
           "--steps 40` (deep prompts sit at the last 3 layers by default) or build the gallery with "
           "`python -m core precompute`.")
KIND_ORDER = ["data", "prior sample", "prior", "trained"]


@st.cache_data(show_spinner="Collecting activations and sampling the prior ...", max_entries=8)
def interpolation_view(fingerprint: str, layer: int, paths: tuple[str, ...]) -> rc.InterpolationView:
    # fingerprint keys the cache by model weights and precision; the model itself comes from ui_state.
    return rc.interpolation_view(ui_state.current_model(), layer, list(paths))


st.title("Interpolation")
st.caption("Can the model use vectors between the MATH and C4 activation clusters? The interpolation prior samples "
           "α·x + (1-α)·y with x, y from Gaussians fitted on MATH and on C4 activations; deep prompts trained "
           "from it show where training moves them.")
lm = ui_state.current_model()
mine, _ = rc.runs_for_model(lm)
deep = [e for e in mine if e.info.method == "deep"]
layer = st.slider("Layer", 0, lm.num_layers, value=lm.num_layers - 1, key="interp_layer",
                  help="0 = embedding output; l = the input of decoder block l, where deep prompt 'deep.l' sits. "
                       f"Deep prompts use the last 3 blocks ({lm.num_layers - 3}..{lm.num_layers - 1}) by default.")
tensor = "soft" if layer == 0 else f"deep.{layer}"
candidates = {e.label: str(e.path) for e in (mine if layer == 0 else deep)
              if tensor in rc.prompt_tensors([e.path])}
chosen = st.multiselect("Trained prompts to draw", list(candidates), default=list(candidates)[:3],
                        key="interp_runs", help=f"Runs that hold a prompt tensor {tensor!r}.")
if not candidates:
    st.info(NO_RUNS)
store = ArtifactStore()
usable, note = store.status(lm.fingerprint)
stored_view = rc.load_interpolation_view(store, lm.fingerprint, layer, [Path(candidates[c]).name for c in chosen])
view = stored_view or interpolation_view(lm.fingerprint, layer, tuple(candidates[c] for c in chosen))

points = view.points
tips = ["group", "kind", "text", alt.Tooltip("position", format=".2f", title="MATH-C4 position")]
data = alt.Chart(points[points["kind"] == "data"]).mark_circle(size=10, opacity=0.35).encode(
    x=alt.X("x", title=view.x_label), y=alt.Y("y", title=view.y_label),
    color=alt.Color("group", title="points", scale=alt.Scale(scheme="tableau10")), tooltip=tips)
prompts = alt.Chart(points[points["kind"] != "data"]).mark_point(size=60, filled=True).encode(
    x="x", y="y", color="group", shape=alt.Shape("kind", title="kind", sort=KIND_ORDER), tooltip=tips)
st.altair_chart((data + prompts).properties(
    title=f"Activations at layer {layer} with interpolation prior samples and trained prompts", height=520,
).interactive(), width="stretch")
st.caption(view.note + " Data: " + "; ".join(dataset_label(d) for d in ("c4", "squad", "math")) + ".")

st.subheader("Where the vectors land on the MATH-C4 axis")
stored = store.load_table("interpolation") if usable else None
positions = view.positions.assign(source="live")
if stored is not None and not stored.empty:
    gallery = stored[stored["layer"] == layer].assign(source="precomputed")
    positions = positions[~positions["run"].isin(gallery["run"])]
    positions = pd.concat([positions, gallery[["run", "kind", "vector", "position", "source"]]], ignore_index=True)
fresh = positions["run"] == "interpolation prior sample"
positions = positions.assign(distribution=positions["kind"].map(
    {"prior": "runs' prior sample (step 0)", "posterior": "trained (posterior)"}).where(
    ~fresh, "fresh interpolation prior sample"))
hist = alt.Chart(positions).transform_joinaggregate(total="count()", groupby=["distribution"]).transform_calculate(
    share="1 / datum.total").mark_bar(opacity=0.55).encode(
    x=alt.X("position:Q", bin=alt.Bin(maxbins=40), title="projection on the C4 (0) to MATH (1) axis"),
    y=alt.Y("sum(share):Q", stack=None, title="share of the distribution's vectors", axis=alt.Axis(format="%")),
    color=alt.Color("distribution:N", title="distribution"),
    tooltip=["distribution:N", alt.Tooltip("count():Q", title="vectors"),
             alt.Tooltip("sum(share):Q", title="share", format=".1%")])
ends = alt.Chart(alt.Data(values=[{"at": 0.0, "mean": "C4 mean"}, {"at": 1.0, "mean": "MATH mean"}])).mark_rule(
    strokeDash=[4, 3], color="black").encode(x="at:Q", tooltip=["mean:N"])
st.altair_chart((hist + ends).properties(
    title=f"Prior vs posterior positions on the MATH-C4 axis at layer {layer}", height=300), width="stretch")
post = positions[positions["kind"] == "posterior"]["position"]
if len(post):
    inside = float(((post > 0) & (post < 1)).mean())
    st.markdown(f"**{inside:.0%}** of {len(post)} trained vectors project between the C4 and MATH means "
                f"(median position {post.median():.2f}).")
st.caption("Position 0 is the C4 activation mean and 1 the MATH mean at this layer; the prior's α ~ U[0, 1] spreads "
           "its samples between them. " + (note if stored is not None else ""))
