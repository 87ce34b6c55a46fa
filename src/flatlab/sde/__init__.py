"""flatlab.sde (being built)."""
