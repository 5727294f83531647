"""The one place for Streamlit plumbing shared by every page: cached model, sidebar state.

Pages call `current_model()` for the loaded model chosen in the sidebar and
`current_dataset()` for the dataset role; core never sees streamlit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import streamlit as st

from core.compute import decide_for, default_precision
from core.models import DEFAULT_MODEL, PRECISIONS, LoadedModel, known_fingerprint, load_model, resolve_device

T = TypeVar("T")
DATASETS = {"math": "MATH (arithmetic)", "squad": "QA (SQuAD format)", "c4": "web text (C4 role)"}
DEFAULTS = {"model_name": DEFAULT_MODEL, "precision": default_precision(), "dataset": "math"}  # bf16 on a CUDA GPU


def init_state() -> None:
    """Set each shared key once, so widgets keep their values across reruns."""
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value)


@st.cache_resource(show_spinner="Loading model ...", max_entries=2)
def _cached_model(name: str, precision: str) -> LoadedModel:
    # Every argument is part of the key: name and precision pick the weights, device is auto.
    return load_model(name, precision=precision)


@st.cache_resource
def _memo_store() -> dict:
    return {}


def memo(namespace: str, key: str, build: Callable[[], T], max_entries: int = 6) -> T:
    """A process-wide cache for objects whose building reports progress to the page.

    `st.cache_resource` replays the elements a cached function draws, so a progress
    bar updated from inside it breaks; here `build` runs outside any cache and may draw.
    """
    store = _memo_store().setdefault(namespace, OrderedDict())
    if key in store:
        store.move_to_end(key)
        return store[key]
    value = build()
    store[key] = value
    while len(store) > max_entries:
        store.popitem(last=False)
    return value


def current_model() -> LoadedModel:
    init_state()
    return _cached_model(st.session_state["model_name"], st.session_state["precision"])


def current_fingerprint() -> str:
    """The sidebar model's `fingerprint`; for the embedded model without loading it, so a page can serve its
    committed artifacts before (or instead of) the model load."""
    init_state()
    known = known_fingerprint(st.session_state["model_name"], st.session_state["precision"])
    return known or current_model().fingerprint


@st.cache_resource
def _decision(precision: str, device: str):  # noqa: ANN202 - core.compute.ComputeDecision
    return decide_for(precision, device)


def compute_decision():  # noqa: ANN201 - core.compute.ComputeDecision
    """What compute 'auto' resolves to for the sidebar's precision on this machine's device, and why."""
    init_state()
    return _decision(st.session_state["precision"], str(resolve_device("auto")))


def current_dataset() -> str:
    init_state()
    return st.session_state["dataset"]


def sidebar() -> None:
    """Model, precision and dataset pickers shared by every page."""
    init_state()
    with st.sidebar:
        st.header("Prior Lab")
        st.text_input(
            "Model", key="model_name",
            help=f"'{DEFAULT_MODEL}' is embedded and offline; any Hugging Face id or local folder also works.",
        )
        st.selectbox("Precision", PRECISIONS, key="precision", help="int8 uses bitsandbytes (CPU or GPU).")
        st.caption(f"Compute: {compute_decision().reason}",
                   help="Every page, training run and precomputed artifact uses compute 'auto': bf16 only where "
                        "this device multiplies bf16 matrices clearly faster than fp32 (measured once per machine).")
        st.selectbox("Dataset", list(DATASETS), key="dataset", format_func=DATASETS.get)


def show_unreadable_runs() -> None:
    """One row per run folder (yours, the gallery's, or a sweep's trial) whose run.json cannot be read: its file
    and the problem."""
    from pathlib import Path

    from core.analysis.runs_compare import ORIGINS
    from core.runs import scan_runs
    from core.sweep.record import list_sweeps

    roots = [*ORIGINS.values(), *(s.path for s in list_sweeps(list(ORIGINS.values())))]
    problems = [p for root in dict.fromkeys(Path(r).resolve() for r in roots) for p in scan_runs(root).problems]
    if problems:
        st.warning(f"{len(problems)} run folder(s) cannot be read and are left out; fix or delete their run.json:")
        st.dataframe([{"file": str(p.file), "problem": p.problem} for p in problems], hide_index=True)


def model_runs_or_stop(lm: LoadedModel, use: str, no_runs: str) -> list:
    """Runs trained on the loaded model (`RunEntry`s); says how many others are hidden, stops the page if none."""
    from core.analysis.runs_compare import runs_for_model

    show_unreadable_runs()
    mine, others = runs_for_model(lm)
    if others:
        st.caption(f"{len(others)} run(s) trained on other weights are hidden: load their model to {use} them.")
    if not mine:
        st.info(no_runs)
        st.stop()
    return mine


def session_job(key: str, none_yet: str = ""):  # noqa: ANN201 - core.jobs.Job or SweepJob, or None
    """The background job whose id is in `st.session_state[key]`, or None: then `none_yet` (if any) is shown as
    info, or a warning says the job is gone (the server restarted)."""
    from core import jobs

    job_id = st.session_state.get(key)
    if job_id is None:
        if none_yet:
            st.info(none_yet)
        return None
    try:
        return jobs.get_job(job_id)
    except KeyError as exc:
        st.warning(str(exc))
        return None


@st.fragment(run_every=1.5)
def sweep_panel(key: str) -> None:
    """Polls the background sweep whose job id is in `st.session_state[key]`: progress, cancel, finished trials."""
    import pandas as pd

    job = session_job(key)
    if job is None:
        return
    snap = job.snapshot()
    done, total = len(snap["finished"]), max(snap["trials"], 1)
    now = f"{snap['current']}: step {snap['step']} of {snap['total']}, " if snap["current"] and not job.finished else ""
    st.progress(min(done / total, 1.0), text=f"sweep {snap['state']}: {done} of {total} trials finished; {now}"
                                             f"{snap['wall']:.0f} s")
    if not job.finished and st.button("Cancel the sweep (finished trials are kept; the CLI resumes the rest)",
                                      key=f"{key}_cancel"):
        job.cancel()
    if snap["finished"]:
        st.dataframe(pd.DataFrame(snap["finished"]), hide_index=True, width="stretch")
    if snap["error"]:
        st.error(f"Sweep failed: {snap['error']}")
    elif job.finished:
        st.success(f"Sweep {snap['state']} in `{snap['out_dir']}` ({snap['counts']}); the *Runs* page shows each "
                   f"prior's mean with its 95% CI. Resume or extend it with `python -m core sweep --out "
                   f"{snap['out_dir']}`.")
