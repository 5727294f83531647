"""Prior Lab core library: models, data, activations, priors, tuning, analysis.

Never imports streamlit; every page and script calls into here.
"""
