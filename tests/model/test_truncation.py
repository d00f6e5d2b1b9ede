"""Attention truncation in the HSTU block (issue 29, point 4) and the semi-local window's way
from NetworkArgs to the kernel (point 2): layers above k run on each sample's last T tokens
only, the tokens before keep their layer-k state, and the window reaches ``hstu_attention``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hstu.model.builder import build_block
from hstu.model.hstu_block import TRUNCATION_SYNC, HSTUBlock
from hstu.model.hstu_layer import LayerOptions
from hstu.ops import lengths_to_offsets

LENGTHS = [9, 3, 14, 6]
CONTEXTUAL = [2, 1, 3, 0]
TARGETS = [2, 1, 3, 1]


def _block(truncation: tuple[int, int] = (0, 0), num_layers: int = 3) -> HSTUBlock:
    torch.manual_seed(0)
    options = LayerOptions(relative_attention_bias=True, rab_num_positions=32, target_group_size=1)
    block = HSTUBlock(num_layers, 16, 2, 8, options, num_position_buckets=32,
                      attn_truncation_layers=truncation[0], attn_truncation_len=truncation[1])
    return block.double().eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor(LENGTHS)
    total = int(lengths.sum())
    x = torch.randn(total, 16, generator=g, dtype=torch.float64)
    ts = torch.cumsum(torch.randint(1, 3000, (total,), generator=g), 0)
    return (x, lengths_to_offsets(lengths), max(LENGTHS), torch.tensor(CONTEXTUAL),
            torch.tensor(TARGETS), ts)


def _record_tokens(block: HSTUBlock) -> list[int]:
    seen: list[int] = []
    for layer in block.layers:
        layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    return seen


def test_truncation_covering_every_sample_is_the_untruncated_block() -> None:
    plain, truncated = _block(), _block((1, max(LENGTHS)))
    truncated.load_state_dict(plain.state_dict())
    args = _inputs()
    torch.testing.assert_close(truncated(*args), plain(*args), rtol=0, atol=1e-12)


def test_upper_layers_run_on_the_last_tokens_only() -> None:
    """Layers 2..3 see sum(min(n_b, T)) tokens; each sample's slice gives what the upper
    layers give on that suffix alone; the tokens before it keep their layer-1 state."""
    keep = 5
    block = _block((1, keep))
    seen = _record_tokens(block)
    x, offsets, max_seqlen, ctx, targets, ts = _inputs()
    with torch.no_grad():
        out = block(x, offsets, max_seqlen, ctx, targets, ts)
    kept = [min(n, keep) for n in LENGTHS]
    assert seen == [sum(LENGTHS), sum(kept), sum(kept)]
    assert sum(kept) < sum(LENGTHS)

    # the same block, untruncated, stopped after layer 1: the state the early tokens keep
    plain = _block()
    plain.load_state_dict(block.state_dict())
    first = {}
    plain.layers[0].register_forward_hook(lambda _m, _a, y: first.setdefault("y", y))
    with torch.no_grad():
        plain(x, offsets, max_seqlen, ctx, targets, ts)
    after_first = first["y"]
    for b, n in enumerate(LENGTHS):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        start = max(0, n - keep)
        torch.testing.assert_close(out[lo:lo + start], after_first[lo:lo + start], rtol=0, atol=0)
        # the upper layers on this sample's suffix alone, contextual tokens cut with it
        y = after_first[lo + start:hi]
        one = torch.tensor([0, hi - lo - start])
        c = torch.tensor([max(0, CONTEXTUAL[b] - start)])
        with torch.no_grad():
            for layer in block.layers[1:]:
                y = layer(y, one, min(max_seqlen, keep), c, torch.tensor([TARGETS[b]]),
                          ts[lo + start:hi], scaling_seqlen=max_seqlen)
        torch.testing.assert_close(out[lo + start:hi], y, rtol=1e-12, atol=1e-12)


def test_early_tokens_get_gradient_through_the_full_layers_only() -> None:
    keep = 5
    block = _block((1, keep))
    x, offsets, max_seqlen, ctx, targets, ts = _inputs()
    x.requires_grad_(True)
    state = {}

    def keep_grad(_m, _a, y):
        y.retain_grad()
        state["y"] = y

    block.layers[0].register_forward_hook(keep_grad)
    out = block(x, offsets, max_seqlen, ctx, targets, ts)
    early = torch.zeros(x.shape[0], dtype=torch.bool)
    for b, n in enumerate(LENGTHS):
        early[int(offsets[b]):int(offsets[b]) + max(0, n - keep)] = True
    assert early.any()
    # a loss on the kept tokens: the upper layers never read an early token's layer-1 state,
    # but the early inputs still reach it through layer 1
    out[~early].pow(2).sum().backward(retain_graph=True)
    y_grad = state["y"].grad
    assert torch.count_nonzero(y_grad[early]) == 0
    assert torch.count_nonzero(y_grad[~early]) > 0
    assert x.grad[early].abs().sum() > 0
    # a loss on the early tokens: their output is their layer-1 state, the upper layers idle
    block.zero_grad()
    x.grad = None
    state["y"].grad = None
    out[early].sum().backward()
    torch.testing.assert_close(state["y"].grad[early], torch.ones_like(state["y"].grad[early]))
    assert torch.count_nonzero(state["y"].grad[~early]) == 0
    for layer in block.layers[1:]:
        assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in layer.parameters())
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0
               for p in block.layers[0].parameters())


def test_candidates_beyond_the_kept_tokens_are_refused() -> None:
    block = _block((1, 2))
    with pytest.raises(ValueError, match=r"keeps the last 2 tokens .* fewer than a sample's 3 candidates"):
        block(*_inputs())


@pytest.mark.parametrize("k, keep, why", [
    (3, 4, r"attn_truncation_layers must be in \(0, num_layers=3\), got 3"),
    (1, 0, r"attn_truncation_len must be > 0"),
])
def test_block_refuses_bad_truncation(k, keep, why) -> None:
    with pytest.raises(ValueError, match=why):
        _block((k, keep))


def _network(**over):
    values = {"num_layers": 3, "hidden_size": 16, "num_attention_heads": 2, "kv_channels": 8,
              "dtype_str": "float32", "kernel_backend": "pytorch"}
    values.update(over)
    return SimpleNamespace(num_position_buckets=32, **values)


def test_the_window_reaches_the_kernel(monkeypatch) -> None:
    """NetworkArgs.max_attn_len / min_full_attn_seq_len go to every layer's hstu_attention
    call; without a window the call carries neither (the kernels' call is unchanged)."""
    from hstu.model import hstu_layer

    calls: list[dict] = []
    real = hstu_layer.hstu_attention

    def spy(*args, **kwargs):
        calls.append(dict(kwargs))
        # recorded, then left out: the result is not what this test checks
        for name in ("max_attn_len", "min_full_attn_seq_len"):
            kwargs.pop(name, None)
        return real(*args, **kwargs)

    monkeypatch.setattr(hstu_layer, "hstu_attention", spy)
    x, offsets, max_seqlen, ctx, targets, _ = _inputs()
    for over, want in (({}, None), ({"max_attn_len": 4, "min_full_attn_seq_len": 2}, (4, 2))):
        calls.clear()
        block = build_block(_network(**over), max_seqlen)
        with torch.no_grad():
            block(x.float(), offsets, max_seqlen, ctx, targets)
        assert len(calls) == 3
        for kw in calls:
            got = (kw["max_attn_len"], kw["min_full_attn_seq_len"]) if "max_attn_len" in kw else None
            assert got == want


def test_build_block_takes_the_truncation_from_network_args() -> None:
    block = build_block(_network(attn_truncation_layers=2, attn_truncation_len=4), 16)
    assert (block.attn_truncation_layers, block.attn_truncation_len) == (2, 4)


# ------------------------------------------------------------------ gin checks


@pytest.mark.usefixtures("clean_gin")
@pytest.mark.parametrize("params, task, field, why", [
    (["NetworkArgs.attn_truncation_layers=2"], "retrieval", "NetworkArgs.attn_truncation_len",
     "must be > 0 with attn_truncation_layers=2"),
    (["NetworkArgs.attn_truncation_layers=9", "NetworkArgs.attn_truncation_len=8"], "retrieval",
     "NetworkArgs.attn_truncation_layers", "must be < num_layers"),
    (["NetworkArgs.min_full_attn_seq_len=8"], "retrieval", "NetworkArgs.min_full_attn_seq_len",
     "needs max_attn_len > 0"),
    (["NetworkArgs.max_attn_len=-1"], "retrieval", "NetworkArgs.max_attn_len", "must be >= 0"),
    (["NetworkArgs.attn_truncation_layers=1", "NetworkArgs.attn_truncation_len=8",
      'NetworkArgs.sequence_layout="padded"'], "retrieval", "NetworkArgs.attn_truncation_layers",
     'needs sequence_layout="jagged"'),
])
def test_config_refuses_bad_window_or_truncation(params, task, field, why) -> None:
    from hstu.args import ConfigError
    from hstu.config import load_config

    with pytest.raises(ConfigError) as err:
        load_config("configs/debug_retrieval.gin", ["NetworkArgs.num_layers=3", *params], task=task)
    line = str(err.value)
    assert "\n" not in line and field in line and why in line, line
    assert "debug_retrieval.gin" in line or "<gin-param>" in line or "--gin-param" in line, line


@pytest.mark.usefixtures("clean_gin")
def test_config_refuses_candidates_beyond_the_truncation() -> None:
    from hstu.args import ConfigError
    from hstu.config import load_config

    with pytest.raises(ConfigError, match=r"NetworkArgs.attn_truncation_len.*cannot hold the 16 "
                                          r"candidates"):
        load_config("configs/benchmark_ranking.gin", [
            "NetworkArgs.attn_truncation_layers=1", "NetworkArgs.attn_truncation_len=8",
        ], task="ranking")
    cfg = load_config("configs/benchmark_ranking.gin", [
        "NetworkArgs.attn_truncation_layers=1", "NetworkArgs.attn_truncation_len=16",
        "NetworkArgs.max_attn_len=32", "NetworkArgs.min_full_attn_seq_len=4",
    ], task="ranking")
    assert (cfg.network.attn_truncation_len, cfg.network.max_attn_len) == (16, 32)


# ------------------------------------------------- host-side sizes: no host sync in a step
def test_host_sizes_give_the_same_block_without_a_host_read() -> None:
    """``truncated_sizes`` (the loader's host counts) replace the device read: the same output,
    and under the sync audit the call reads nothing from the device (the fallback names its
    read)."""
    from hstu.sync_audit import sync_audit

    keep = 5
    block = _block((1, keep))
    args = _inputs()
    sizes = (sum(min(n, keep) for n in LENGTHS), max(TARGETS))
    with torch.no_grad(), sync_audit() as audit:
        got = block(*args, truncated_sizes=sizes)
    # (the CPU attention backend names its own per-batch reads: not this test's)
    assert TRUNCATION_SYNC not in {e.reason for e in audit.allowed}
    with torch.no_grad(), sync_audit() as audit:
        want = block(*args)
    assert TRUNCATION_SYNC in {e.reason for e in audit.allowed}
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_batch_sizes_count_the_kept_tokens() -> None:
    import numpy as np

    from hstu.data.batch import BatchSizes

    hist, cand = np.array([3, 0, 7, 2]), np.array([1, 2, 0, 4])
    parts = (BatchSizes.of(hist[:2], cand[:2]), BatchSizes.of(hist[2:], cand[2:]))
    whole = BatchSizes.total(parts)
    # X = 1 contextual token, A = 2 (item and action tokens): n = 1 + 2H + C = [8, 3, 15, 9]
    assert whole.truncated_tokens(6, 1, 2) == (6 + 3 + 6 + 6, 4)
    assert whole == BatchSizes.of(hist, cand)  # the per-sample arrays are not compared


def _audited_truncation(rank: int, world_size: int, tmp: str, task: str, tp: int) -> None:
    """A few audited trainer steps with truncation on (tests/training/test_sync_matrix.py),
    recording what the block was given; its host sizes checked against the device after."""
    from tests.training.test_sync_matrix import audited_trainer_steps

    seen = []
    truncate = HSTUBlock._truncate

    def recording(self, offsets, num_contextual, num_targets, timestamps, truncated_sizes):
        seen.append((truncated_sizes, offsets.detach().clone(), num_targets.detach().clone()))
        return truncate(self, offsets, num_contextual, num_targets, timestamps, truncated_sizes)

    HSTUBlock._truncate = recording
    keep = 8
    try:
        tp_params = [f"TensorModelParallelArgs.tensor_model_parallel_size={tp}"] if tp > 1 else []
        audited_trainer_steps(task, tmp, f"{task}-tp{tp}", [
            *tp_params, "NetworkArgs.num_layers=2", "NetworkArgs.attn_truncation_layers=1",
            f"NetworkArgs.attn_truncation_len={keep}",
        ])
    finally:
        HSTUBlock._truncate = truncate
    assert len(seen) == 3
    for sizes, offsets, targets in seen:
        lengths = offsets[1:] - offsets[:-1]
        assert sizes is not None, "the step read the truncation sizes from the device"
        assert sizes == (int(lengths.clamp(max=keep).sum()), int(targets.max()))
        assert sizes[0] < int(lengths.sum())  # the truncation cut tokens


@pytest.mark.parametrize("task, world_size, tp", [("ranking", 1, 1), ("retrieval", 2, 2)])
def test_truncated_steps_do_not_sync(tmp_path, task, world_size, tp) -> None:
    """NetworkArgs.attn_truncation_*: trainer steps under the sync audit raise nothing; with
    TP=2 the block's sizes are those of the TP group's gathered samples."""
    from tests.dist_utils import run_multiprocess

    run_multiprocess(_audited_truncation, world_size=world_size, tmp=str(tmp_path), task=task, tp=tp)
