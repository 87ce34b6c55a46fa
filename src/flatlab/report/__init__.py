"""flatlab.report (being built)."""
