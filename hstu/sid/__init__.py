"""The semantic-id tokenizer's command (``python -m hstu.sid.tokenize``, docs/semantic_ids.md)
and its inputs (:mod:`hstu.sid.inputs`: an item file, a file of vectors or a checkpoint's item
table). The codes, their fitting (residual k-means) and their file live in
:mod:`hstu.data.semantic_ids`, below the model that reads them."""

from hstu.data.semantic_ids import SidCodes, load_codes, save_codes, tokenize

__all__ = ["SidCodes", "load_codes", "save_codes", "tokenize"]
