"""Ranking with a cached history: encoding the history once and scoring candidates against
the per-layer keys and values gives the full forward's scores (docs/serving.md "Ranking with
a cached history"); the padded inference model equals the trainer's jagged dense module."""

from __future__ import annotations

import pytest
import torch

from hstu.serving.model import InferenceHSTU


def _cfg(**over) -> dict:
    cfg = {
        "task": "ranking", "hidden_size": 16, "num_layers": 2, "num_heads": 2, "head_dim": 8,
        "alpha": 0.35, "scaling_seqlen": 40, "norm_eps": 1e-05, "norm_affine": True,
        "uvqk_bias": True, "output_bias": False, "is_causal": True, "mask_convention": "hstu",
        "target_group_size": 1,
        "num_position_buckets": 64, "use_position_embedding": True,
        "relative_attention_bias": False, "rab_num_positions": 48, "rab_use_time": True,
        "num_contextual": 2, "has_action": True, "projections": {"ctx": 4, "ctx2": 4},
        "item_feature_name": "item", "action_feature_name": "action",
        "contextual_feature_names": ["ctx", "ctx2"], "head_arch": [12, 3], "head_bias": True,
        "head_activation": "relu", "num_tasks": 1,
        "feature_dims": {"item": 16, "action": 16, "ctx": 4, "ctx2": 4},
    }
    cfg.update(over)
    if cfg["num_contextual"] == 0:
        cfg.update(contextual_feature_names=[], projections={})
    return cfg


def _random_model(cfg: dict) -> InferenceHSTU:
    torch.manual_seed(0)
    model = InferenceHSTU(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def _inputs(cfg: dict, hist: list[int], cands: list[int]):
    torch.manual_seed(1)
    bsz, slots = len(hist), max(h + c for h, c in zip(hist, cands))
    items = torch.randn(bsz, slots, 16)
    lengths = torch.tensor([h + c for h, c in zip(hist, cands)])
    num_c = torch.tensor(cands)
    ts = torch.cumsum(torch.randint(0, 5000, (bsz, slots)), 1)
    acts = torch.randn(bsz, slots, 16) if cfg["has_action"] else None
    ctx = torch.randn(bsz, cfg["num_contextual"], 4) if cfg["num_contextual"] else None
    return items, lengths, num_c, ts, acts, ctx


VARIANTS = {
    "default": {},
    "rab_time_groups": {"relative_attention_bias": True, "target_group_size": 2, "uvqk_bias": False,
                            "norm_affine": False, "output_bias": True, "alpha": 1.0},
    "rab_position_only_no_ctx_no_actions": {"relative_attention_bias": True, "rab_use_time": False,
                                                "num_contextual": 0, "has_action": False},
    # contextual rows see the whole history: still independent of the candidates
    "peer_mask_groups": {"mask_convention": "peer", "target_group_size": 2},
}


def test_cached_history_is_refused_where_history_sees_candidates() -> None:
    """"peer" without the causal mask: history keys/values depend on the candidates."""
    model = _random_model(_cfg(mask_convention="peer", is_causal=False))
    items, _, _, ts, acts, ctx = _inputs(model.cfg, [3], [2])
    with pytest.raises(ValueError, match=r'^cached history: mask_convention="peer" with '
                                         r"is_causal=False lets the history see the candidates"):
        model.encode_history(items[:, :3], torch.tensor([3]), ts[:, :3], acts[:, :3], ctx)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_history_equals_full_forward(variant) -> None:
    cfg = _cfg(**VARIANTS[variant])
    model = _random_model(cfg)
    hist, cands = [7, 3, 12], [4, 1, 3]
    items, lengths, num_c, ts, acts, ctx = _inputs(cfg, hist, cands)
    with torch.no_grad():
        full = model(items, lengths, num_c, ts, acts, ctx)  # [B, L, W]
        h = torch.tensor(hist)
        hmax, kmax = max(hist), max(cands)
        first_cand_ts = ts.gather(1, h.unsqueeze(1)).squeeze(1)
        keys, values, hist_ts, n_hist = model.encode_history(
            items[:, :hmax], h, ts[:, :hmax], None if acts is None else acts[:, :hmax], ctx, first_cand_ts
        )
        idx = (h.unsqueeze(1) + torch.arange(kmax)).clamp(max=items.shape[1] - 1)
        cand_items = items.gather(1, idx.unsqueeze(-1).expand(-1, -1, items.shape[2]))
        cand_ts = ts.gather(1, idx)
        cached = model.score_candidates(keys, values, hist_ts, n_hist, cand_items, num_c, cand_ts)
    for b in range(len(hist)):
        want = full[b, hist[b] : hist[b] + cands[b]]
        got = cached[b, : cands[b]]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_convention, causal",
                         [("hstu", True), ("peer", True), ("hstu", False), ("peer", False)])
def test_padded_inference_model_equals_the_trainer_dense_module(mask_convention, causal) -> None:
    """The trainer's RankingModel (jagged tokens, pytorch kernel) and InferenceHSTU with its
    state dict give the same candidate logits, relative attention bias on, in each mask
    convention (the exported model must score with the mask it was trained with)."""
    want, got = trainer_and_serving_logits(mask_convention, causal)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def trainer_and_serving_logits(mask_convention: str = "hstu", causal: bool = True, *,
                               window: tuple[int, int] = (0, 0),
                               truncation: tuple[int, int] = (0, 0)):
    """(trainer's candidate logits, InferenceHSTU's with the same state dict) on the batch
    of ``tests.serving.helpers.trainer_ranking_model_and_batch`` (its arguments)."""
    from hstu.serving.artifact import candidate_logits
    from tests.serving.helpers import trainer_ranking_model_and_batch

    dense, batch, embeddings, cfg = trainer_ranking_model_and_batch(
        mask_convention, causal, window=window, truncation=truncation)
    model = InferenceHSTU(cfg)
    model.load_state_dict(dense.state_dict())
    model.eval()
    dense.eval()
    with torch.no_grad():
        _, (want, _) = dense(batch, embeddings)
        inputs = _padded_from_embeddings(batch, embeddings, cfg)
        got = candidate_logits(model(*inputs), inputs[1], inputs[2])
    return want, got


def _padded_from_embeddings(batch, embeddings, cfg):
    item = embeddings[cfg["item_feature_name"]]
    lengths = item.lengths()
    bsz, slots = lengths.numel(), int(lengths.max())
    pos = torch.arange(slots).unsqueeze(0) < lengths.unsqueeze(1)
    items = torch.zeros(bsz, slots, item.values().shape[1])
    items[pos] = item.values()
    ts = torch.zeros(bsz, slots, dtype=torch.int64)
    ts[pos] = batch.timestamps
    act = embeddings[cfg["action_feature_name"]]
    apos = torch.arange(slots).unsqueeze(0) < act.lengths().unsqueeze(1)
    acts = torch.zeros(bsz, slots, act.values().shape[1])
    acts[apos] = act.values()
    ctx = torch.stack([embeddings[n].values() for n in cfg["contextual_feature_names"]], 1)
    return items, lengths, batch.num_candidates, ts, acts, ctx


def test_benchmark_script_reports_the_speed_ratio() -> None:
    """scripts/bench_kv_cache.py: same scores, and the cache is faster (the loose bound only
    guards against losing the O(K x history) path; measured figures: docs/serving.md)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, str(root / "scripts" / "bench_kv_cache.py"), "--reps", "5"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "faster" in proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["max_abs_diff"] < 1e-5
    assert result["speedup"] > 2.0
