"""Serving a trained model with torch alone: the exported artifact's reader and the
inference-time dense model (no torchrec, megatron or gin imports; docs/serving.md)."""
