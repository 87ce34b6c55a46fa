"""flatlab.sparsity (being built)."""
