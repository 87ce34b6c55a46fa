"""Recipes for training with flatlab's optimizers inside other frameworks.

``flatlab.integrations.huggingface``: :class:`SharpnessAwareTrainer`, a ``transformers.Trainer``
that drives the closure of a flatlab sharpness-aware optimizer (needs ``transformers`` and
``accelerate``; imported on demand, so ``import flatlab`` never needs them).
"""
