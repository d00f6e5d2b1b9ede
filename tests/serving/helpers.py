"""A trainer-side ranking dense module (relative attention bias on, contextual features,
actions, several candidates) with one batch, and the InferenceHSTU config that matches it."""

from __future__ import annotations

import torch

from hstu.model.hstu_block import HSTUBlock
from hstu.model.hstu_layer import LayerOptions
from hstu.model.ranking import MLP, RankingModel
from hstu.model.tokens import TokenBuilder, max_token_seqlen
from tests.model.helpers import TinyEmbeddings, make_batch


def trainer_ranking_model_and_batch(mask_convention: str = "hstu", causal: bool = True, *,
                                    window: tuple[int, int] = (0, 0),
                                    truncation: tuple[int, int] = (0, 0)):
    """``window``: (max_attn_len, min_full_attn_seq_len); ``truncation``:
    (attn_truncation_layers, attn_truncation_len)."""
    torch.manual_seed(3)
    dims = {"item": 16, "action": 16, "ctx": 4, "ctx2": 4}
    max_items = 12
    max_tokens = max_token_seqlen(max_items, 2, True)
    options = LayerOptions(relative_attention_bias=True, rab_num_positions=max_tokens, alpha=None,
                           target_group_size=2, mask_convention=mask_convention, is_causal=causal,
                           max_attn_len=window[0], min_full_attn_seq_len=window[1])
    block = HSTUBlock(2, 16, 2, 8, options, num_position_buckets=64,
                      attn_truncation_layers=truncation[0], attn_truncation_len=truncation[1])
    tokens = TokenBuilder(16, "item", "action", ["ctx", "ctx2"], dims)
    head = MLP(16, [12, 3])
    dense = RankingModel(tokens, block, head, num_tasks=1, max_item_seqlen=max_items)
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    emb = TinyEmbeddings({"item": (30, 16), "action": (5, 16), "ctx": (7, 4), "ctx2": (7, 4)})
    history = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]
    candidates = [[16, 17, 18], [19], [20, 21, 22, 23]]
    actions = [[j % 5 for j in h] for h in history]
    g = torch.Generator().manual_seed(5)
    stamps = [torch.cumsum(torch.randint(1, 4000, (len(h) + len(c),), generator=g), 0).tolist()
              for h, c in zip(history, candidates)]
    batch = make_batch(history, candidates, actions, {"ctx": [1, 2, 3], "ctx2": [4, 5, 6]},
                       labels=[j % 3 for c in candidates for j in c], timestamps=stamps, max_seqlen=max_items)
    embeddings = emb(batch.features)
    layer = block.layers[0]
    cfg = {
        "task": "ranking", "hidden_size": 16, "num_layers": 2, "num_heads": 2, "head_dim": 8, "alpha": layer.alpha,
        "scaling_seqlen": max_tokens, "norm_eps": layer.norm_eps, "norm_affine": True, "uvqk_bias": True,
        "output_bias": False, "is_causal": causal, "mask_convention": mask_convention,
        "target_group_size": 2, "num_position_buckets": 64,
        "use_position_embedding": True, "relative_attention_bias": True, "rab_num_positions": max_tokens,
        "rab_use_time": True, "num_contextual": 2, "has_action": True,
        "projections": {name: p.in_features for name, p in tokens.projections.items()},
        "item_feature_name": "item", "action_feature_name": "action", "contextual_feature_names": ["ctx", "ctx2"],
        "head_arch": [12, 3], "head_bias": True, "head_activation": "relu", "num_tasks": 1, "feature_dims": dims,
        "max_item_seqlen": max_items, "max_attn_len": window[0], "min_full_attn_seq_len": window[1],
        "attn_truncation_layers": truncation[0], "attn_truncation_len": truncation[1],
    }
    return dense, batch, embeddings, cfg
