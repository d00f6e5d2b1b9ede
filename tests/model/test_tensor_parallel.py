"""TP=2 (Megatron-core linears over gloo) against TP=1 with the same weights."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from hstu.args import NetworkArgs, RankingArgs, RetrievalArgs
from hstu.model.builder import ModelDataInfo, build_model
from hstu.model.hstu_layer import HSTULayer
from hstu.model.tensor_parallel import (
    shard_output_weight,
    shard_uvqk,
    unshard_uvqk,
    uvqk_shard_rows,
)
from tests.dist_utils import run_multiprocess
from tests.model.helpers import TinyEmbeddings, make_batch, ranking_tables

H, D_HEAD, D = 4, 4, 16


def _gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def _unshard(name: str, grad: torch.Tensor, group, num_heads: int, head_dim: int) -> torch.Tensor:
    """TP-rank tensors of parameter ``name`` -> the TP=1 tensor."""
    if name.endswith(("uvqk.weight", "uvqk.bias")):
        return unshard_uvqk(_gather(grad, group), num_heads, head_dim)
    if name.endswith("output.weight"):
        return torch.cat(_gather(grad, group), dim=1)
    if "output_norm" in name:
        return torch.cat(_gather(grad, group), dim=0)
    return grad


def _layer_case(rank: int, group) -> None:
    kwargs = {"relative_attention_bias": True, "rab_num_positions": 8, "output_bias": True}
    torch.manual_seed(0)
    ref = HSTULayer(D, H, D_HEAD, **kwargs)
    torch.manual_seed(0)
    tp = HSTULayer(D, H, D_HEAD, tp_group=group, **kwargs)
    assert tp.local_heads == H // 2
    # same seed -> TP init is exactly the shard of the TP=1 init
    _close(tp.uvqk.weight, shard_uvqk(ref.uvqk.weight, H, D_HEAD, 2, rank), "init uvqk")
    _close(tp.output.weight, shard_output_weight(ref.output.weight, 2, rank), "init W_o")

    # make every parameter non-trivial, then load the shards
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        tp.uvqk.weight.copy_(shard_uvqk(ref.uvqk.weight, H, D_HEAD, 2, rank))
        tp.uvqk.bias.copy_(shard_uvqk(ref.uvqk.bias, H, D_HEAD, 2, rank))
        tp.output.weight.copy_(shard_output_weight(ref.output.weight, 2, rank))
        tp.output.bias.copy_(ref.output.bias)
        tp.output_norm_weight.copy_(ref.output_norm_weight.chunk(2)[rank])
        tp.output_norm_bias.copy_(ref.output_norm_bias.chunk(2)[rank])
        for name in ("input_norm_weight", "input_norm_bias", "rab_pos_weights", "rab_ts_weights"):
            getattr(tp, name).copy_(getattr(ref, name))

    offsets = torch.tensor([0, 5, 8, 14])
    nc, nt = torch.tensor([1, 0, 2]), torch.tensor([2, 0, 3])
    ts = torch.arange(14) * 41
    x = torch.randn(14, D, generator=gen)
    g = torch.randn(14, D, generator=gen)
    x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref = ref(x_ref, offsets, 8, nc, nt, ts)
    out_tp = tp(x_tp, offsets, 8, nc, nt, ts)
    _close(out_tp, out_ref, "layer output")
    out_ref.backward(g)
    out_tp.backward(g)
    _close(x_tp.grad, x_ref.grad, "input grad")
    ref_params = dict(ref.named_parameters())
    for name, p in tp.named_parameters():
        _close(_unshard(name, p.grad, group, H, D_HEAD), ref_params[name].grad, f"grad {name}")


def _ranking_case(rank: int, group, **network) -> None:
    """``network``: more NetworkArgs fields (e.g. attention truncation)."""
    net = NetworkArgs(
        num_layers=2,
        hidden_size=D,
        num_attention_heads=H,
        kv_channels=D_HEAD,
        hidden_dropout=0.0,
        dtype_str="float32",
        kernel_backend="pytorch",
        num_position_buckets=64,
        target_group_size=1,
        # the 6-dim user table (feature_dims below) still exercises the contextual projection;
        # NetworkArgs itself now refuses a contextual dim other than the item dim
        **network,
    )
    head_args = RankingArgs(prediction_head_arch=[8, 3], num_tasks=3)
    data, emb = ranking_tables(50, 8, 10, D, 6, seed=5)
    torch.manual_seed(6)
    ref = build_model("ranking", net, head_args, copy.deepcopy(emb), data)
    torch.manual_seed(6)
    tp = build_model("ranking", net, head_args, copy.deepcopy(emb), data, tp_group=group)

    # each rank has its own samples, of different counts and lengths
    if rank == 0:
        batch = make_batch(
            [[1, 2, 3], [4, 5]],
            [[6, 7], [8]],
            [[1, 2, 3], [4, 5]],
            {"user": [1, 2]},
            labels=[5, 2, 7],
            max_seqlen=8,
        )
    else:
        batch = make_batch(
            [[9, 10, 11, 12]],
            [[13, 14, 15]],
            [[0, 1, 2, 3]],
            {"user": [3]},
            labels=[1, 6, 4],
            max_seqlen=8,
        )
    loss_ref, (logits_ref, _) = ref(batch)
    loss_tp, (logits_tp, _) = tp(batch)
    _close(logits_tp, logits_ref, "own logits")
    _close(loss_tp, loss_ref, "own loss")
    loss_ref.backward()
    loss_tp.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in tp.named_parameters():
        want = ref_params[name].grad
        if name.startswith("sparse"):
            _close(p.grad, want, f"embedding grad {name}")  # per rank, own samples only
            continue
        # dense parameters see the TP group's samples: the gradient of the summed losses
        want = want.clone()
        dist.all_reduce(want, group=group)
        _close(_unshard(name, p.grad, group, H, D_HEAD), want, f"dense grad {name}")


def _retrieval_case(rank: int, group) -> None:
    net = NetworkArgs(
        num_layers=1, hidden_size=D, num_attention_heads=H, kv_channels=D_HEAD,
        hidden_dropout=0.0, dtype_str="float32", kernel_backend="pytorch",
        num_position_buckets=64,
    )  # fmt: skip
    data = ModelDataInfo(num_items=40, item_feature_name="item", max_item_seqlen=6)
    torch.manual_seed(5)
    emb = TinyEmbeddings({"item": (40, D)})
    torch.manual_seed(6)
    ref = build_model("retrieval", net, RetrievalArgs(), copy.deepcopy(emb), data)
    torch.manual_seed(6)
    tp = build_model("retrieval", net, RetrievalArgs(), copy.deepcopy(emb), data, tp_group=group)
    history = [[1, 2, 3], [4, 5, 6, 7]] if rank == 0 else [[8, 9, 10, 11, 12, 13]]
    batch = make_batch(history, max_seqlen=6)
    loss_ref, _ = ref(batch)
    loss_tp, _ = tp(batch)
    _close(loss_tp, loss_ref, "retrieval loss")
    loss_ref.backward()
    loss_tp.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in tp.named_parameters():
        want = ref_params[name].grad.clone()
        if not name.startswith("sparse"):
            dist.all_reduce(want, group=group)
        _close(_unshard(name, p.grad, group, H, D_HEAD), want, f"retrieval grad {name}")
    batch.labels = torch.tensor([10, 20]) if rank == 0 else torch.tensor([3])
    got, want = tp.evaluate(batch, top_k=4), ref.evaluate(batch, top_k=4)
    _close(got.top_scores, want.top_scores, "eval top scores")
    assert torch.equal(got.target_ranks, want.target_ranks)


def _body(rank: int, world_size: int) -> None:
    group = dist.new_group(list(range(world_size)))
    _layer_case(rank, group)
    _ranking_case(rank, group)
    # samples of 9, 6 and 12 tokens: the upper layer sees each one's last 4
    _ranking_case(rank, group, attn_truncation_layers=1, attn_truncation_len=4)
    _retrieval_case(rank, group)


def test_tp2_matches_tp1_layer_ranking_retrieval_with_batch_gathering():
    run_multiprocess(_body, world_size=2)


def test_uvqk_shards_hold_whole_heads():
    full = torch.arange(4 * 4 * 2).float().unsqueeze(1)  # H=4 heads of d=2, rows tagged by index
    shards = [shard_uvqk(full, 4, 2, 2, r) for r in range(2)]
    # rank 0 holds heads 0,1 of U (rows 0..3), V (8..11), Q (16..19), K (24..27)
    assert shards[0].squeeze(1).tolist() == [
        0,
        1,
        2,
        3,
        8,
        9,
        10,
        11,
        16,
        17,
        18,
        19,
        24,
        25,
        26,
        27,
    ]
    torch.testing.assert_close(unshard_uvqk(shards, 4, 2), full)
    assert uvqk_shard_rows(4, 2, 1, 0).tolist() == list(range(32))
