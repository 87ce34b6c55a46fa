"""flatlab.models (being built)."""
