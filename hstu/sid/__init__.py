"""Semantic ids: each item as a short sequence of codes learned from its content or its
collaborative vector (residual k-means, :mod:`hstu.sid.tokenizer`), from an item file, a file
of vectors or a checkpoint's item table (:mod:`hstu.sid.inputs`); the command is
``python -m hstu.sid.tokenize`` (docs/semantic_ids.md)."""

from hstu.sid.tokenizer import SidCodes, load_codes, save_codes, tokenize

__all__ = ["SidCodes", "load_codes", "save_codes", "tokenize"]
