"""Prior Lab dashboard: `streamlit run app.py`."""

from pathlib import Path

import streamlit as st

import ui_state

st.set_page_config(page_title="Prior Lab", page_icon="🧭", layout="wide")

PAGES = [  # (file, title, icon); a page file not in this checkout is skipped
    ("pages/1_Home.py", "Home", "🏠"),
    ("pages/2_Embedding_space.py", "Embedding space", "🗺️"),
    ("pages/3_Activations.py", "Activations", "🧪"),
    ("pages/4_Prior_lab.py", "Prior lab", "🎲"),
    ("pages/5_Train.py", "Train", "🏋️"),
    ("pages/6_Divergence.py", "Divergence", "📐"),
    ("pages/7_Interpolation.py", "Interpolation", "↔️"),
    ("pages/8_Runs.py", "Runs", "📊"),
]
root = Path(__file__).parent
pages = [st.Page(f, title=t, icon=i) for f, t, i in PAGES if (root / f).exists()]
ui_state.sidebar()
st.navigation(pages).run()
