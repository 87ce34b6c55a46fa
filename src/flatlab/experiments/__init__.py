"""flatlab.experiments (being built)."""
