"""flatlab.curvature (being built)."""
