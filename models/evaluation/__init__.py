"""Evaluating PIUmr (`python models/evaluate.py`):

- `metrics`: MA-52's official metrics and the challenge submission file.
- `prediction`: a model's predictions over a whole split, gathered over the ranks.
- `figures`: confusion matrices, t-SNE and cosine-similarity histograms.
- `cli`: the command line of models/evaluate.py.
- `ablation`: the ablation runner of models/ablate.py (rows x seeds, table, plot, person gap).
"""
