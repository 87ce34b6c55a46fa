"""flatlab.data (being built)."""
