"""A semantic-id model in an artifact, torch only (``NetworkArgs.architecture = "hstu_sid"``;
docs/serving.md "The artifact").

The artifact's item table holds each item's input vector, the sum of its code rows (plus its
id row where the model adds it): the dense program reads histories exactly as for dense
retrieval and returns each query's state; the code decoder (in ``dense_weights.pt``, with
every item's codes) then decodes the top items by beam search over the trie of valid code
sequences, as the trainer's evaluation does.

Legend: B queries, I item ids, L levels, D hidden width, k top-k.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hstu.model.sid_head import Catalogue, CodeDecoder
from hstu.serving.model import InferenceHSTU, history_pairs


class InferenceSid(InferenceHSTU):
    """:class:`InferenceHSTU` (the encoder: forward returns query states) with the code decoder
    and each item id's codes [I, L] (the trainer's ``SidRetrievalModel`` state dict).

    ``cfg["sid"]``: ``num_codes`` (K_l per level), ``decoder_layers``, ``decoder_heads``,
    ``decoder_ffn_multiplier`` (4 when absent), ``eps``, ``beam_width``, ``certify``,
    ``spread``, ``exclude_history``, ``renormalise`` (the model was trained with
    ``RetrievalArgs.sid_exclude_history_from_loss``)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        sid = cfg["sid"]
        num_codes = [int(k) for k in sid["num_codes"]]
        self.register_buffer(
            "codes", torch.full((int(cfg["num_items"]), len(num_codes)), -1, dtype=torch.int64))
        self.decoder = CodeDecoder(int(cfg["hidden_size"]), num_codes, int(sid["decoder_layers"]),
                                   int(sid["decoder_heads"]), 0.0, float(sid["eps"]),
                                   int(sid.get("decoder_ffn_multiplier", 4)))
        self.num_codes = num_codes
        self._catalogue: Catalogue | None = None
        self.eval()

    def catalogue(self) -> Catalogue:
        if self._catalogue is None:
            self._catalogue = Catalogue(self.codes, self.num_codes, int(self.cfg["min_item_id"]))
        return self._catalogue

    @torch.no_grad()
    def top_k(self, queries: Tensor, histories: list[Tensor], k: int,
              beam_width: int | None = None) -> tuple[Tensor, Tensor]:
        """Query states [B, D] -> (item ids [B, k], scores [B, k]) by beam search, each
        query's history never returned unless the model was trained with
        ``RetrievalArgs.eval_exclude_history`` off (as the trainer's evaluation); ids -1
        (score -inf) where the catalogue holds fewer than k items."""
        excluded = None
        if histories and self.cfg["sid"].get("exclude_history", True):
            excluded = history_pairs(histories)
        beam = max(int(beam_width or self.cfg["sid"]["beam_width"]), k)
        result = self.catalogue().decode(self.decoder, queries, k, beam,
                                         bool(self.cfg["sid"].get("certify", False)), excluded,
                                         float(self.cfg["sid"].get("spread", 0.0)),
                                         renormalise=bool(self.cfg["sid"].get("renormalise",
                                                                              False)))
        return result.items, result.scores


def sid_config(dense: torch.nn.Module) -> dict[str, Any]:
    """The manifest's ``sid`` section of the trainer's ``SidRetrievalModel`` ``dense``."""
    return {
        "num_codes": list(dense.num_codes), "decoder_layers": len(dense.decoder.layers),
        "decoder_heads": dense.decoder.layers[0].heads if len(dense.decoder.layers) else 1,
        "decoder_ffn_multiplier": (dense.decoder.layers[0].ffn_multiplier
                                   if len(dense.decoder.layers) else 4),
        "eps": float(dense.decoder.norm.eps), "beam_width": int(dense.beam_width),
        "certify": bool(dense.certify), "spread": float(dense.spread),
        "item_embedding": bool(dense.item_embedding),
        "exclude_history": bool(dense.eval_exclude_history),
        "renormalise": bool(dense.exclude_history_from_loss),
    }


__all__ = ["InferenceSid", "sid_config"]
