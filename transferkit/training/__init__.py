"""Staged fine-tuning: the stages, the frozen-part feature cache, callbacks, and checkpoints."""
