"""flatlab.sweep (being built)."""
