"""Analysis on top of activations and prompts; one module per concern, import what you need.

- `core.analysis.projections`: PCA fitted on a reference cloud, t-SNE, outlier accounting
- `core.analysis.trajectories`: sentence paths and their step statistics against random walks
- `core.analysis.separation`: per-layer separation of datasets (silhouette, centroids, probe)
- `core.analysis.divergence`: collapse and divergence measures of prompt vectors
- `core.analysis.activation_views`: the Activations page's views, live or from the committed artifacts
"""
