"""core.analysis.separation: scores on synthetic groups, the table, and the embedded model."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from core.analysis.separation import COLUMNS, separation_scores, separation_table


def _groups(shift: float, n=30, d=12, seed=0):
    rng = np.random.default_rng(seed)
    return {"c4": rng.normal(size=(n, d)), "math": rng.normal(size=(n, d)) + shift, "squad": rng.normal(size=(n, d))}


def test_far_groups_separate_and_close_ones_do_not():
    far = separation_scores({k: v for k, v in _groups(8.0).items() if k != "squad"})
    near = separation_scores({k: v for k, v in _groups(8.0).items() if k != "math"})
    assert far["silhouette"] > 0.5 and far["probe_accuracy"] > 0.95 and far["centroid_ratio"] > 2
    assert near["silhouette"] < 0.1 and near["probe_accuracy"] < 0.8 and near["centroid_ratio"] < 0.5
    assert far["chance"] == 0.5 and far["n_docs"] == 60


def test_table_long_format_and_csv_round_trip():
    means = {name: {0: g, 3: g * 2} for name, g in _groups(5.0).items()}
    table = separation_table(means)
    assert list(table.columns) == COLUMNS
    assert len(table) == 2 * 4
    assert set(table["comparison"]) == {"math vs c4", "squad vs c4", "math vs squad", "all three"}
    back = pd.read_csv(io.StringIO(table.to_csv(index=False)))
    pd.testing.assert_frame_equal(back, table, check_dtype=False)


def test_errors():
    g = _groups(1.0)
    with pytest.raises(ValueError, match="at least 2 datasets"):
        separation_scores({"c4": g["c4"]})
    with pytest.raises(ValueError, match="at least 5 documents"):
        separation_scores({"c4": g["c4"][:3], "math": g["math"]})
    with pytest.raises(ValueError, match="no comparison is possible"):
        separation_table({"c4": {0: g["c4"]}})
    with pytest.raises(ValueError, match="not given"):
        separation_table({"c4": {0: g["c4"]}, "math": {0: g["math"]}}, comparisons={"x": ("c4", "squad")})


@pytest.mark.integration
def test_embedded_model_math_is_separable(real_lm):
    from core.analysis.separation import dataset_separation

    table = dataset_separation(real_lm, n=16, max_length=48, layers=[0, 15, 30])
    mc4 = table[table["comparison"] == "math vs c4"]
    assert len(mc4) == 3
    assert (mc4["probe_accuracy"] > 0.9).all()  # arithmetic vs news is trivially told apart
