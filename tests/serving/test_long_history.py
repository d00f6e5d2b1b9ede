"""Serving with the long-history options (issue 29, point 5): the padded inference model
applies the trainer's semi-local window and attention truncation, the cached history keeps
the window and refuses truncation, the exported program computes the same, and the
artifact carries the settings (version-3 artifacts read as off)."""

from __future__ import annotations

import pytest
import torch

from hstu.model import hstu_layer
from hstu.serving.artifact import (
    READABLE_VERSIONS,
    example_inputs,
    history_cacheable,
)
from hstu.serving.model import InferenceHSTU
from tests.ops.reference import JaggedCase, naive_attention
from tests.serving.test_cached_history import (
    _cfg,
    _inputs,
    _random_model,
    trainer_and_serving_logits,
)


def _reference_kernel(q, k, v, offsets, max_seqlen, *, alpha, scaling_seqlen, causal,
                      num_contextual, num_targets, target_group_size, rab, mask_convention,
                      backend, strict, max_attn_len=0, min_full_attn_seq_len=0):
    """The dense float64 reference (tests/ops/reference.py) as the trainer's kernel, window
    included, whatever the backends of this checkout take."""
    del backend, strict
    case = JaggedCase(q, k, v, offsets, max_seqlen, num_contextual, num_targets, rab)
    return naive_attention(
        case, alpha=alpha, scaling_seqlen=scaling_seqlen, causal=causal,
        target_group_size=target_group_size, mask_convention=mask_convention,
        max_attn_len=max_attn_len, min_full_attn_seq_len=min_full_attn_seq_len,
    ).to(q.dtype)


def _trainer_and_serving_logits(window, truncation, mask_convention="hstu"):
    return trainer_and_serving_logits(mask_convention, window=window, truncation=truncation)


# samples of 15, 7 and 22 tokens (2 contextual, 3 / 1 / 4 candidates): T = 6 cuts all three
# differently (the second keeps one of its contextual tokens)
CASES = {
    "window": ((3, 0), (0, 0)),
    "window_min_full": ((3, 2), (0, 0)),
    "truncation": ((0, 0), (1, 6)),
    "window_and_truncation": ((2, 0), (1, 6)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mask_convention", ["hstu", "peer"])
def test_serving_model_equals_the_trainer(case, mask_convention, monkeypatch) -> None:
    window, truncation = CASES[case]
    # the reference kernel in the trainer's layers: the same on every case, so the full model
    # below is the baseline each option must change
    monkeypatch.setattr(hstu_layer, "hstu_attention", _reference_kernel)
    want, got = _trainer_and_serving_logits(window, truncation, mask_convention)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain, _ = _trainer_and_serving_logits((0, 0), (0, 0), mask_convention)
    assert (want - plain).abs().max() > 1e-4, "the option changed nothing on these samples"


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_real_kernel_equals_serving(case) -> None:
    """The trainer's own pytorch kernel, window and truncation included."""
    window, truncation = CASES[case]
    want, got = _trainer_and_serving_logits(window, truncation)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain, _ = _trainer_and_serving_logits((0, 0), (0, 0))
    assert (want - plain).abs().max() > 1e-4, "the option changed nothing on these samples"


@pytest.mark.parametrize("window", [(2, 0), (4, 0), (2, 3)])
def test_cached_history_with_a_window_equals_the_full_forward(window) -> None:
    cfg = _cfg(max_attn_len=window[0], min_full_attn_seq_len=window[1])
    model = _random_model(cfg)
    hist, cands = [7, 3, 12], [4, 1, 3]
    items, lengths, num_c, ts, acts, ctx = _inputs(cfg, hist, cands)
    with torch.no_grad():
        full = model(items, lengths, num_c, ts, acts, ctx)
        plain = _random_model(_cfg())(items, lengths, num_c, ts, acts, ctx)
        h = torch.tensor(hist)
        hmax, kmax = max(hist), max(cands)
        keys, values, hist_ts, n_hist = model.encode_history(
            items[:, :hmax], h, ts[:, :hmax], acts[:, :hmax], ctx)
        idx = (h.unsqueeze(1) + torch.arange(kmax)).clamp(max=items.shape[1] - 1)
        cand_items = items.gather(1, idx.unsqueeze(-1).expand(-1, -1, items.shape[2]))
        cached = model.score_candidates(keys, values, hist_ts, n_hist, cand_items, num_c, ts.gather(1, idx))
    changed = False
    for b in range(len(hist)):
        want = full[b, hist[b]:hist[b] + cands[b]]
        torch.testing.assert_close(cached[b, :cands[b]], want, rtol=1e-5, atol=1e-5)
        changed |= bool((want - plain[b, hist[b]:hist[b] + cands[b]]).abs().max() > 1e-4)
    assert changed, "the window changed no candidate's score"


def test_cached_history_refuses_truncation() -> None:
    cfg = _cfg(attn_truncation_layers=1, attn_truncation_len=6)
    model = _random_model(cfg)
    items, _, _, ts, acts, ctx = _inputs(cfg, [3], [2])
    with pytest.raises(ValueError, match=r"^cached history: attention truncation keeps each "
                                         r"sample's last 6 tokens, candidates included"):
        model.encode_history(items[:, :3], torch.tensor([3]), ts[:, :3], acts[:, :3], ctx)
    assert not history_cacheable(cfg)
    assert history_cacheable(_cfg(max_attn_len=2))


def test_bad_truncation_in_a_config_is_refused() -> None:
    with pytest.raises(ValueError, match=r"attn_truncation_layers must be in \(0, num_layers=2\), got 2"):
        InferenceHSTU(_cfg(attn_truncation_layers=2, attn_truncation_len=4))
    with pytest.raises(ValueError, match=r"min_full_attn_seq_len=3 needs max_attn_len > 0"):
        InferenceHSTU(_cfg(min_full_attn_seq_len=3))


def test_a_config_without_the_keys_is_full_attention() -> None:
    """Format-3 artifacts name none of the four settings: they read as off."""
    assert 3 in READABLE_VERSIONS
    model = InferenceHSTU(_cfg())
    options = model.options
    assert (options.max_attn_len, options.min_full_attn_seq_len, model.truncation_layers) == (0, 0, 0)


def test_the_exported_program_keeps_window_and_truncation() -> None:
    """torch.export of forward (symbolic batch and length) computes what the eager model does,
    on inputs longer than the export's examples."""
    cfg = _cfg(max_attn_len=2, attn_truncation_layers=1, attn_truncation_len=6)
    model = _random_model(cfg)
    from hstu.export import _Forward

    args, shapes = example_inputs(cfg)["forward"]
    from torch.export import Dim

    dims = {"B": Dim("batch", min=1, max=64), "L": Dim("items", min=2, max=256)}
    dyn = tuple(None if s is None else {i: dims[d] for i, d in enumerate(s) if d is not None}
                for s in shapes)
    program = torch.export.export(_Forward(model, "forward", len(args)), tuple(args),
                                  dynamic_shapes=dyn, strict=False).module()
    items, lengths, num_c, _, acts, ctx = _inputs(cfg, [7, 3, 12], [4, 1, 3])
    with torch.no_grad():
        want = model(items, lengths, num_c, None, acts, ctx)
        got = program(items, lengths, num_c, None, acts, ctx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
