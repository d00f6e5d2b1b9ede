"""NetworkArgs.architecture = "sasrec" (issue 41, item 1): the SASRec block against a plain
PyTorch reference written here, that it learns, that 2 processes over a row-wise item table
take the steps of 1, that its exported program ranks as the trainer's evaluation, and that
--check-config takes the preset and refuses what SASRec cannot run."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hstu.args import NetworkArgs, RetrievalArgs
from hstu.model.builder import ModelDataInfo, build_model
from hstu.model.metrics import retrieval_metrics
from hstu.model.sasrec import SASRecBlock, SASRecInference, inference_config
from hstu.serving.artifact import Corpus
from tests.dist_utils import run_multiprocess
from tests.model.helpers import TinyEmbeddings, make_batch, popularity_hr10
from tests.model.test_retrieval_learns import NUM_ITEMS, SEQ_LEN, _markov_users
from tests.test_check_config import check_config
from tests.training.test_distributed import _close, _close_table, _train_and_dump

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
PRESET = "ml-100k_sasrec_retrieval.gin"


# ------------------------------------------------------------------ reference


def _reference_layer(layer, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One SASRec layer written out: x [B, W, D] padded, each head's
    softmax(Q K^T / sqrt(d) + mask) V with the mask -inf above the diagonal and on padding keys."""
    width = x.shape[1]
    heads, d = layer.num_heads, layer.head_dim
    i = torch.arange(width).view(1, -1, 1)
    j = torch.arange(width).view(1, 1, -1)
    visible = (j <= i) & ((j < lengths.view(-1, 1, 1)) | (j == i))  # [B, W, W]
    h = F.layer_norm(x, (x.shape[-1],), layer.attn_norm.weight, layer.attn_norm.bias, layer.attn_norm.eps)
    w, b = layer.qkv.weight, layer.qkv.bias
    per_head = []
    for head in range(heads):
        def proj(k: int, head: int = head) -> torch.Tensor:
            rows = slice(k * heads * d + head * d, k * heads * d + (head + 1) * d)
            return h @ w[rows].t() + b[rows]

        q, k, v = proj(0), proj(1), proj(2)  # [B, W, d]
        scores = q @ k.transpose(1, 2) / math.sqrt(d)
        scores = scores.masked_fill(~visible, float("-inf"))
        per_head.append(torch.softmax(scores, dim=-1) @ v)
    attn = torch.cat(per_head, -1) @ layer.output.weight.t() + layer.output.bias
    if layer.attn_gate is not None:
        attn = torch.sigmoid(x @ layer.attn_gate.weight.t() + layer.attn_gate.bias) * attn
    x = x + attn
    h = F.layer_norm(x, (x.shape[-1],), layer.ffn_norm.weight, layer.ffn_norm.bias, layer.ffn_norm.eps)
    z = h @ layer.ffn_in.weight.t()
    if layer.ffn_activation == "swiglu":
        inner = z.shape[-1] // 2
        z = z[..., :inner] * torch.sigmoid(z[..., :inner]) * z[..., inner:]
        f = z @ layer.ffn_out.weight.t()
    else:
        z = z + layer.ffn_in.bias
        z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2))) if layer.ffn_activation == "gelu" else z.clamp(min=0)
        f = z @ layer.ffn_out.weight.t() + layer.ffn_out.bias
    if layer.ffn_gate is not None:
        f = torch.sigmoid(x @ layer.ffn_gate.weight.t() + layer.ffn_gate.bias) * f
    return x + f


# (token counts, padded width W): the block's max_seqlen and the reference's padding
BATCHES = {
    "small": ([5, 1, 9, 3], 9),
    # empty samples, and lengths 1..40 that the jagged layout runs in several chunks
    "spread": ([0, 40, 1, 2, 17, 0, 33, 8, 5, 21, 3, 12, 39, 1, 26, 7], 48),
}


@pytest.mark.parametrize("layout", ["jagged", "padded"])
@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("ffn,gated", [("swiglu", True), ("gelu", False), ("relu", True)])
def test_block_equals_a_plain_softmax_attention_reference(ffn: str, gated: bool, batch: str, layout: str) -> None:
    """Both layouts against the reference over garbage padding, dropout off: equal within
    float32 rounding (rtol = atol = 1e-5)."""
    torch.manual_seed(0)
    dim, heads, head_dim = 16, 2, 8
    block = SASRecBlock(2, dim, heads, head_dim, ffn_activation=ffn, ffn_multiplier=2,
                        gated_residual=gated, num_position_buckets=64, sequence_layout=layout).eval()
    with torch.no_grad():  # away from the identity-like init (LayerNorm 1/0, zero biases)
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    counts, width = BATCHES[batch]
    lengths = torch.tensor(counts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    x = torch.randn(int(lengths.sum()), dim)
    with torch.no_grad():
        got = block(x, offsets, width)

        # the reference: pad with garbage (a real token never sees it), positions 0..n-1
        padded = torch.randn(len(lengths), width, dim) * 10
        for b, (s, n) in enumerate(zip(offsets[:-1].tolist(), lengths.tolist())):
            padded[b, :n] = x[s:s + n]
        pos = torch.arange(width).expand(len(lengths), -1)
        h = padded * math.sqrt(dim) + block.position_embedding.weight[pos]
        for layer in block.layers:
            h = _reference_layer(layer, h, lengths)
        h = F.layer_norm(h, (dim,), block.final_norm.weight, block.final_norm.bias, block.final_norm.eps)
        want = torch.cat([h[b, :n] for b, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_jagged_layout_trains_as_the_padded_one() -> None:
    """Dropout off, the same weights: the jagged layout's states and gradients (every
    parameter's, the input tokens') are the padded layout's within float32 rounding (the CPU
    attention kernel blocks its rows by the chunk's width, so not bitwise)."""
    torch.manual_seed(2)
    counts, width = BATCHES["spread"]
    lengths = torch.tensor(counts)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    x = torch.randn(int(lengths.sum()), 16)
    jagged = SASRecBlock(2, 16, 2, 8, num_position_buckets=64)
    padded = SASRecBlock(2, 16, 2, 8, num_position_buckets=64, sequence_layout="padded")
    padded.load_state_dict(jagged.state_dict())
    states, grads = {}, {}
    for name, block in (("jagged", jagged), ("padded", padded)):
        tokens = x.clone().requires_grad_()
        out = block(tokens, offsets, width)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        states[name] = out.detach()
        grads[name] = {"tokens": tokens.grad, **{k: p.grad for k, p in block.named_parameters()}}
    torch.testing.assert_close(states["jagged"], states["padded"], rtol=1e-5, atol=1e-5)
    for key, grad in grads["padded"].items():
        torch.testing.assert_close(grads["jagged"][key], grad, rtol=1e-4, atol=1e-5, msg=key)


def test_a_sequence_layout_other_than_jagged_or_padded_is_refused() -> None:
    with pytest.raises(ValueError, match='sequence_layout must be "jagged" or "padded"'):
        SASRecBlock(1, 16, 2, 8, sequence_layout="bucketed")


@pytest.mark.parametrize("layout", ["jagged", "padded"])
def test_a_token_never_sees_later_tokens(layout: str) -> None:
    """Changing a sample's last token leaves every earlier state unchanged (causality), and
    the other samples' states too."""
    torch.manual_seed(1)
    block = SASRecBlock(2, 16, 2, 8, num_position_buckets=32, sequence_layout=layout).eval()
    offsets = torch.tensor([0, 6, 10])
    x = torch.randn(10, 16)
    y = x.clone()
    y[5] += 3.0  # sample 0's last token
    with torch.no_grad():
        a, b = block(x, offsets, 8), block(y, offsets, 8)
    assert torch.equal(a[:5], b[:5]) and torch.equal(a[6:], b[6:])
    assert not torch.allclose(a[5], b[5])


# ------------------------------------------------------------------ learning


def _network(**kw) -> NetworkArgs:
    args = {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "kv_channels": 8,
            "hidden_dropout": 0.0, "dtype_str": "float32", "num_position_buckets": 64, "architecture": "sasrec"}
    return NetworkArgs(**{**args, **kw})


def _model(net: NetworkArgs, num_items: int, max_items: int, seed: int = 0):
    data = ModelDataInfo(num_items=num_items, item_feature_name="item", max_item_seqlen=max_items, min_item_id=1)
    torch.manual_seed(seed)
    emb = TinyEmbeddings({"item": (num_items, net.resolved_item_embedding_dim)})
    for table in emb.tables.values():
        torch.nn.init.normal_(table.weight, std=0.1)
    return build_model("retrieval", net, RetrievalArgs(num_negatives=-1, temperature=0.1), emb, data)


def test_sasrec_learns_and_beats_popularity_on_markov_data() -> None:
    users = _markov_users()
    train = [u[:-1] for u in users]
    history, targets = [u[:-1] for u in users], [u[-1] for u in users]
    rng = np.random.default_rng(1)
    model = _model(_network(), NUM_ITEMS, SEQ_LEN + 1)
    assert type(model.dense_module.block).__name__ == "SASRecBlock"
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(60):
        pick = rng.choice(len(train), size=64, replace=False)
        loss, _ = model(make_batch([train[i] for i in pick], max_seqlen=SEQ_LEN + 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    batch = make_batch(history, labels=targets, max_seqlen=SEQ_LEN + 1)
    model_hr = float(retrieval_metrics(model.evaluate(batch, top_k=10).target_ranks, ["HR@10"])["HR@10"].mean())
    pop_hr = popularity_hr10(train, history, targets, NUM_ITEMS)
    print(f"sasrec HR@10 {model_hr:.3f}, popularity HR@10 {pop_hr:.3f}, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert model_hr > 3 * pop_hr and model_hr > 0.5, (model_hr, pop_hr)


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("item_dim", [-1, 8])
def test_exported_program_top10_equals_the_trainer_evaluation(item_dim: int) -> None:
    """The padded SASRecInference (torch.export'ed) on the artifact's padded inputs gives the
    trainer's evaluation top-10 (ids equal, scores within float noise), users for users."""
    max_items = 16  # the trainer pads to 16 tokens, the artifact's inputs to the longest history (12)
    net = _network(num_layers=2, item_embedding_dim=item_dim, hidden_dropout=0.3)
    model = _model(net, 40, max_items, seed=2)
    with torch.no_grad():
        for p in model.dense_module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    g = torch.Generator().manual_seed(3)
    histories = [torch.randint(1, 40, (n,), generator=g).tolist() for n in (12, 1, 7, 3, 10)]
    targets = [int(t) for t in torch.randint(1, 40, (5,), generator=g)]
    batch = make_batch(histories, labels=targets, max_seqlen=max_items)
    ref = model.evaluate(batch, top_k=10)

    cfg = inference_config(model, SimpleNamespace(task="retrieval"), SimpleNamespace(action_feature_name=None))
    inference = SASRecInference(cfg)
    inference.load_state_dict(model.dense_module.state_dict())
    inference.eval()
    table = model.sparse.tables["item"].weight.detach()
    lengths = torch.tensor([len(h) for h in histories])
    items = torch.zeros(len(histories), int(lengths.max()), table.shape[1])
    for b, h in enumerate(histories):
        items[b, : len(h)] = table[torch.tensor(h)]
    args = (items, lengths, torch.zeros_like(lengths))
    from torch.export import Dim

    users, slots = Dim("batch", min=1, max=1024), Dim("items", min=2, max=1024)
    dims = ({0: users, 1: slots}, {0: users}, {0: users})
    program = torch.export.export(inference, args, dynamic_shapes=dims, strict=False).module()
    queries = program(*args)
    corpus = Corpus({"ids": torch.arange(40), "vectors": table}, {**cfg, "num_items": 40, "min_item_id": 1})
    ids, scores = corpus.top_k(queries, [torch.tensor(h) for h in histories], 10)
    assert torch.equal(ids, ref.top_ids)
    torch.testing.assert_close(scores, ref.top_scores, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_cli_export_and_recommend_equal_the_trainer_evaluation(tmp_path) -> None:
    """The debug preset with SASRec trained, exported by ``python -m hstu.export`` and read by
    ``hstu.recommend`` in a process without torchrec/megatron/gin: its top-10 per user is the
    trainer's evaluation of the same checkpoint."""
    from tests.serving.test_export import _check_top_k, _train_export_reference

    params = ('NetworkArgs.architecture="sasrec"', "DatasetArgs.action_tokens=False", "DatasetArgs.contextual_features=[]")
    run = _train_export_reference(tmp_path, "retrieval", *params, name="sasrec")
    _check_top_k(run, tmp_path)


# ------------------------------------------------------------------ 2 processes = 1


def test_two_processes_over_a_row_wise_item_table_take_the_steps_of_one(tmp_path, monkeypatch) -> None:
    """Full-corpus softmax over a row-wise item table (each rank scores the world's queries
    against its rows): 2 processes x 8 samples take the 20 steps of 1 process x 16."""
    tmp = str(tmp_path)
    monkeypatch.setenv("HSTU_CPU_CLAIMS_FILE", os.path.join(tmp, "cpu-claims"))
    params = [
        'NetworkArgs.architecture="sasrec"', "NetworkArgs.hidden_dropout=0.0",
        "TrainerArgs.max_train_iters=20", 'TrainerArgs.pipeline_type="none"', "OptimizerArgs.clip_grad_norm=0.05",
        'OptimizerArgs.optimizer_str="sgd"', "OptimizerArgs.learning_rate=0.1",
        'OptimizerArgs.sparse_optimizer_str="rowwise_adagrad"', "OptimizerArgs.sparse_learning_rate=0.02",
        "RetrievalArgs.temperature=0.2", 'RetrievalArgs.negative_sampling="full_corpus"',
        "RetrievalArgs.num_negatives=-1", "RetrievalArgs.exclude_history_from_loss=True",
        'RetrievalArgs.full_corpus_matmul_dtype="float32"',
        'item/EmbeddingArgs.feature_names=["item_id"]', 'item/EmbeddingArgs.table_name="item"',
        'item/EmbeddingArgs.sharding_type="model_parallel"', 'item/EmbeddingArgs.sharding_override="row_wise"',
    ]
    run_multiprocess(_train_and_dump, world_size=1, tmp=tmp, task="retrieval", tag="ref",
                     params=[*params, "TrainerArgs.train_batch_size=16"])
    run_multiprocess(_train_and_dump, world_size=2, tmp=tmp, task="retrieval", tag="dp2",
                     params=[*params, "TrainerArgs.train_batch_size=8"])
    ref = torch.load(os.path.join(tmp, "ref.pt"))
    got = torch.load(os.path.join(tmp, "dp2.pt"))
    assert len(ref["losses"]) == 20 and ref["losses"][-1] < ref["losses"][0]
    assert ref["split"] is False and got["split"] is True, "the row-wise item table was not split over 2 ranks"
    assert any(".qkv." in name for name in ref["dense"]), "not the SASRec block"
    _close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), "losses")
    assert got["dense"].keys() == ref["dense"].keys()
    for name, value in ref["dense"].items():
        _close(got["dense"][name], value, name)
    _close_table(got["tables"]["item"], ref["tables"]["item"], "item table")


# ------------------------------------------------------------------ configuration


@pytest.mark.usefixtures("plain_process")
def test_check_config_accepts_the_preset(capsys, tmp_path) -> None:
    data = ROOT / "tmp_data" / "ml-100k"
    if not (data / "metadata.json").is_file():  # preprocess the real ML-100K here
        raw = ROOT.parent / "shared" / "data" / "ml-100k"
        if not raw.is_dir():
            pytest.skip(f"needs the real ML-100K at {raw} (or tmp_data/ml-100k preprocessed)")
        from hstu.data.preprocess import main as preprocess

        assert preprocess(["--dataset", "ml-100k", "--raw", str(raw), "--out", str(tmp_path)]) == 0
        data = tmp_path / "ml-100k"
    code, out, err = check_config(capsys, "retrieval", PRESET, "--gin-param", f'DatasetArgs.dataset_path="{data}"')
    assert code == 0 and "configuration OK" in out, err
    # the preset's dropout "auto" keeps the 0.5 tuned on ML-100K's 943 users
    assert '[hstu] hidden_dropout "auto" -> 0.5: 943 sequences' in out, out


@pytest.mark.usefixtures("plain_process")
@pytest.mark.parametrize("param,field,why", [
    ('NetworkArgs.architecture="sasrek"', "NetworkArgs.architecture", "'sasrek' is not one of 'hstu' | 'sasrec'"),
    ("NetworkArgs.relative_attention_bias=True", "NetworkArgs.relative_attention_bias", "option of the HSTU block"),
    ("NetworkArgs.sasrec_ffn_activation=\"tanh\"", "NetworkArgs.sasrec_ffn_activation", "'tanh' is not one of"),
])
def test_check_config_refuses_in_one_line(capsys, param: str, field: str, why: str) -> None:
    code, _, err = check_config(capsys, "retrieval", PRESET, "--gin-param", param)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"{field}: " in lines[0] and why in lines[0], lines[0]


@pytest.mark.usefixtures("plain_process")
def test_sasrec_ranking_and_tensor_parallel_are_refused(capsys) -> None:
    code, _, err = check_config(capsys, "ranking", "debug_ranking.gin", "--gin-param", 'NetworkArgs.architecture="sasrec"')
    assert code == 2 and "NetworkArgs.architecture: sasrec is a retrieval model" in err, err
    code, _, err = check_config(capsys, "retrieval", "debug_retrieval.gin", "--world-size", "2",
                          "--gin-param", 'NetworkArgs.architecture="sasrec"',
                          "--gin-param", "TensorModelParallelArgs.tensor_model_parallel_size=2")
    assert code == 2 and "tensor_model_parallel_size: 2: NetworkArgs.architecture=\"sasrec\"" in err, err


@pytest.mark.usefixtures("plain_process")
def test_hstu_layer_options_bound_in_a_sasrec_run_are_named_as_unread(capsys) -> None:
    # the own-data recipe's HSTU options with SASRec's block: each binding one warning with its
    # file:line; the options refused when on, bound off, say how SASRec runs (no warning)
    code, _, err = check_config(
        capsys, "retrieval", "debug_retrieval.gin", "--gin-param", 'NetworkArgs.architecture="sasrec"',
        "--gin-param", "NetworkArgs.attn_scaling_seqlen=20",
        "--gin-param", "NetworkArgs.relative_attention_bias=False",
    )
    assert code == 0, err
    unread = [line for line in err.splitlines() if "does not read it" in line]
    assert len(unread) == 2, err
    assert unread[0].startswith("warning: ") and "debug_retrieval.gin:23: NetworkArgs.kernel_backend: " in unread[0], unread
    assert "--gin-param 'NetworkArgs.attn_scaling_seqlen=20'" in unread[1] and "NetworkArgs.attn_scaling_seqlen: " in unread[1], unread
    # the same file with HSTU's block reads them all; SASRec's own presets bind none of them
    code, _, err = check_config(capsys, "retrieval", "debug_retrieval.gin", "--gin-param", "NetworkArgs.attn_scaling_seqlen=20")
    assert code == 0 and "does not read it" not in err, err
    from hstu.config import load_config

    for preset in sorted((ROOT / "configs").glob("*sasrec*.gin")):
        cfg = load_config(str(preset), [], task="retrieval", world_size=1)
        assert cfg.network.architecture == "sasrec" and cfg.warnings == [], (preset.name, cfg.warnings)


# ------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize("ffn,gated", [("swiglu", True), ("gelu", False)])
def test_step_flops_count_the_blocks_matmuls(ffn: str, gated: bool) -> None:
    """sasrec_step_flops (what the step log's TFLOP/s and MFU read) against torch's FLOP
    counter on the block's forward, samples at full width (no padding): the projections and
    the feed-forward network exactly; the attention as causal pairs (the counter either skips
    the CPU SDPA op or counts it over the full square)."""
    from torch.utils.flop_counter import FlopCounterMode

    from hstu.model.sasrec import sasrec_step_flops

    net = _network(num_layers=2, sasrec_ffn_activation=ffn, sasrec_gated_residual=gated, sasrec_ffn_multiplier=3)
    block = SASRecBlock(2, 16, 2, 8, ffn_activation=ffn, gated_residual=gated, ffn_multiplier=3).eval()
    bsz, width = 3, 10
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        block(torch.randn(bsz * width, 16), torch.arange(bsz + 1) * width, width)
    ours = sasrec_step_flops(torch.full((bsz,), width), net) / 3  # the forward
    causal = 2 * 4 * 16 * bsz * width * (width + 1) / 2  # layers x 4·Hd x pairs
    square = 2 * 4 * 16 * bsz * width * width
    assert counter.get_total_flops() in (ours - causal, ours - causal + square), (counter.get_total_flops(), ours)
