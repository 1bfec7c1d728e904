"""Looking inside a trained ViT: analysis.py computes (attention rollout, attention distance, Figure 7),
plots.py draws every figure of the project, text.py shows names as printable text (no matplotlib)."""
