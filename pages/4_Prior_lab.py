"""Prior lab: pick a prior and its options, sample it, see the sample over the reference cloud, send it to Train."""

import json

import altair as alt
import streamlit as st

import ui_state
from core.data import dataset_label
from core.priors import PRIOR_NAMES, SamplingError, make_prior, prior_options
from core.priors.base import REGISTRY
from core.priors.report import prior_view, sample_report

TABLE_ROWS = 200  # per-vector measures for at most this many vectors (nearest-token search is O(n·V))

st.title("Prior lab")
st.caption("Initial prompt vectors from each prior, against the token embeddings or a dataset's activations.")
lm = ui_state.current_model()


def option_widget(field, key: str):  # noqa: ANN001, ANN201 - a dataclasses.Field -> its value
    """One widget per config option, from the option's type and metadata."""
    meta, label = field.metadata, field.name.replace("_", " ")
    kind = str(field.type)
    if "choices" in meta:
        return st.selectbox(label, meta["choices"], index=meta["choices"].index(field.default), key=key,
                            help=meta["help"])
    if kind == "bool":
        return st.checkbox(label, value=field.default, key=key, help=meta["help"])
    if kind == "str":
        return st.text_input(label, value=field.default, key=key, help=meta["help"])
    is_int = kind.startswith("int")
    cast = int if is_int else float
    bounds = {b: cast(meta[b]) for b in ("min", "max") if b in meta}
    step = cast(meta.get("step", 1 if is_int else 0.01))
    fmt = None if is_int else "%g"
    return st.number_input(label, value=field.default, step=step, min_value=bounds.get("min"),
                           max_value=bounds.get("max"), format=fmt, key=key,
                           help=meta["help"] + (" (leave empty for the default)" if "None" in kind else ""))


def cached_prior(fingerprint: str, params_json: str, progress=None):  # noqa: ANN001, ANN201
    # Key: the model fingerprint and every option; progress only reports, it changes nothing in the result.
    def build():  # noqa: ANN202
        params = json.loads(params_json)
        return make_prior(params.pop("name"), lm=ui_state.current_model(), progress=progress, **params)

    return ui_state.memo("priors", f"{fingerprint}|{params_json}", build)


@st.cache_data(max_entries=12, show_spinner="Sampling, nearest tokens and Mahalanobis distances ...")
def sampled(fingerprint: str, params_json: str, n: int):  # noqa: ANN201
    # The sample is fixed by the options (their seed) and n, so reruns (a button click) reuse it.
    prior = cached_prior(fingerprint, params_json)
    sample = prior.sample(n)
    stats = dict(prior.last_stats)
    table, summary = sample_report(ui_state.current_model(), prior, sample[:TABLE_ROWS])
    return sample, stats, table, summary


@st.cache_data(max_entries=12, show_spinner="Projecting (t-SNE takes a while the first time) ...")
def projected(fingerprint: str, params_json: str, n: int, method: str):  # noqa: ANN201
    sample = sampled(fingerprint, params_json, n)[0]
    return prior_view(ui_state.current_model(), cached_prior(fingerprint, params_json), sample,
                      max_reference=1000 if method == "tsne" else 3000, method=method)


name = st.selectbox("Prior", PRIOR_NAMES, key="prior_lab_name",
                    format_func=lambda n: f"{n}: {REGISTRY[n].summary}")
with st.expander("Options", expanded=True):
    cols = st.columns(3)
    options = {}
    for i, field in enumerate(prior_options(name)):
        with cols[i % 3]:
            options[field.name] = option_widget(field, key=f"prior_lab_{name}_{field.name}")
left, right = st.columns(2)
n = left.slider("Vectors to sample (n)", 1, 2000, 20, key="prior_lab_n")
view = right.radio("View", ["PCA", "t-SNE"], horizontal=True, key="prior_lab_view",
                   help="PCA axes are fitted on the reference cloud; t-SNE embeds a subsample and the sample jointly.")

bar = st.empty()
params_json = json.dumps({"name": name, **options})
try:
    prior = cached_prior(lm.fingerprint, params_json,
                         lambda f: bar.progress(min(1.0, f), text="Computing dataset activations (cached after) ..."))
    sample, stats, table, summary = sampled(lm.fingerprint, params_json, int(n))
except (ValueError, SamplingError) as exc:
    st.info(f"These options do not work: {exc}")
    st.stop()
bar.empty()

st.markdown(f"**{prior.describe()}**")
if hasattr(prior, "widening_note"):  # the exclusion prior: how much c actually widens the fit at this width
    st.caption(prior.widening_note())
datasets = [v for k, v in options.items() if k.startswith("source") and v != "tokens"]
if datasets:
    st.caption("Data: " + "; ".join(dataset_label(d) for d in dict.fromkeys(datasets)))
metrics = st.columns(4)
metrics[0].metric("Median nearest-token cosine", f"{summary['median_nearest_cos']:.3f}")
maha = next(k for k in summary if k.startswith("median_mahalanobis"))
metrics[1].metric("Median Mahalanobis", f"{summary[maha]:.1f}",
                  help=f"Under the Gaussian fit of {summary[maha.removeprefix('median_') + '_fit']}; "
                       f"a typical point of the fit sits near sqrt(d) = {lm.hidden_size ** 0.5:.0f} (the typical "
                       "shell); a smaller distance is not 'more on the data', it is atypical too.")
metrics[2].metric("Median norm / vocabulary norm", f"{summary['median_norm_ratio']:.2f}")
rate = stats.get("acceptance_rate")
metrics[3].metric("Acceptance rate", "n/a" if rate is None else f"{rate:.2%}",
                  help=None if rate is None else f"{stats['candidates']:,} candidates for {n} samples")
if getattr(prior, "diagnostics", None):
    st.caption("VAE diagnostics: " + ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}"
                                               for k, v in prior.diagnostics.items() if k != "kl_per_dim"))

pv = projected(lm.fingerprint, params_json, int(n), "tsne" if view == "t-SNE" else "pca")
chart = alt.Chart(pv.frame, title=f"{name} sample over the reference cloud ({view})").mark_circle().encode(
    x=alt.X("x:Q", title=pv.x_label),
    y=alt.Y("y:Q", title=pv.y_label),
    color=alt.Color("group:N", title="points"),
    size=alt.condition(alt.datum.group == "sample", alt.value(60), alt.value(8)),
    opacity=alt.condition(alt.datum.group == "sample", alt.value(0.95), alt.value(0.35)),
    tooltip=[alt.Tooltip("group:N"), alt.Tooltip("label:N"), alt.Tooltip("norm:Q", format=".3f")],
).interactive()
st.altair_chart(chart, width="stretch")
st.caption(pv.note)

st.subheader("Per-vector measures")
if n > TABLE_ROWS:
    st.caption(f"First {TABLE_ROWS} of {n} vectors.")
st.dataframe(table, width="stretch", hide_index=True)

if st.button("Use this sample as the initial prompt on the Train page", key="prior_lab_send"):
    st.session_state["prior_sample"] = {
        "tensor": sample.clone(), "prior": prior.params, "describe": prior.describe(),
    }
    st.success(f"Sent {n} x {lm.hidden_size} vectors from {name} to the Train page.")
