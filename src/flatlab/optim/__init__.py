"""flatlab.optim (being built)."""
