"""flatlab.train (being built)."""
