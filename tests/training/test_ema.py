"""TrainerArgs.ema_decay: the weight average, by hand on one process and at trainer level on
2 gloo processes (a row-wise sharded item table: the average covers each rank's shards).

Trainer level (retrieval, debug preset on synthetic data, 4 steps, checkpoints at 2 and 4):
- the average the trainer keeps equals one computed here from the raw weights recorded after
  every step (tables assembled from both ranks' shards, dense weights);
- the best checkpoint holds the average at its step (the weights evaluated and selected);
- a resume from step 2 ends with the same average and losses as the uninterrupted run;
- one process loading the step-4 checkpoint weights-only (export, recommend) gets the
  average, resharded onto one process.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from hstu.training.ema import WeightAverage, is_table_weight
from tests.dist_utils import run_multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DECAY = 0.9
STEPS, RESUME_AT = 4, 2


def _expected(history: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The average after len(history) updates, written out (decay warm-up included)."""
    avg = {k: v.clone() for k, v in history[0]["init"].items()}
    for t, weights in enumerate(history[1:]):
        d = min(decay, (1.0 + t) / (10.0 + t))
        avg = {k: d * v + (1.0 - d) * weights["w"][k] for k, v in avg.items()}
    return avg


def test_average_by_hand_and_swap_restores_the_raw_weights() -> None:
    torch.manual_seed(0)
    dense = {"head": nn.Linear(3, 2)}
    table = torch.randn(5, 4)
    ema = WeightAverage(dense, {"sparse.tables.embeddings.item.weight": table,
                                "sparse.optim.embeddings.item.weight.momentum": torch.ones(5)},
                        None, DECAY)
    assert [k for k, _, _ in ema.dense] == [("head", "weight"), ("head", "bias")]
    assert list(ema.tables) == ["sparse.tables.embeddings.item.weight"]  # not optimizer state

    def snapshot() -> dict[str, torch.Tensor]:
        p = dense["head"]
        return {"w": p.weight.detach().clone(), "b": p.bias.detach().clone(), "t": table.clone()}

    history = [{"init": snapshot()}]
    with torch.no_grad():
        for _ in range(3):
            dense["head"].weight.add_(torch.randn(2, 3))
            dense["head"].bias.mul_(-2.0)
            table.add_(1.0)
            ema.update()
            history.append({"w": snapshot()})
    want = _expected(history, DECAY)
    raw = snapshot()
    with ema.swapped():
        assert torch.allclose(dense["head"].weight, want["w"], rtol=0, atol=1e-6)
        assert torch.allclose(dense["head"].bias, want["b"], rtol=0, atol=1e-6)
        assert torch.allclose(table, want["t"], rtol=0, atol=1e-6)
        assert not torch.equal(table, raw["t"])
    after = snapshot()
    for k in raw:
        assert torch.equal(after[k], raw[k]), k
    state = ema.dense_state()
    assert state["ema_updates"] == 3
    assert torch.allclose(state["ema"]["head"]["weight"], want["w"], rtol=0, atol=1e-6)


def test_decay_out_of_range_is_refused_in_one_line() -> None:
    from hstu.args import TrainerArgs
    from hstu.validation import ConfigError

    with pytest.raises(ConfigError, match="ema_decay"):
        TrainerArgs(train_batch_size=4, eval_batch_size=4, ema_decay=1.0)


# --------------------------------------------------------------------- trainer level
def _trainer(tmp: str, phase: str, extra: list[str] = ()):
    import gin

    from hstu.config import load_config
    from hstu.training.distributed import init_distributed, set_seed
    from hstu.training.trainer import Trainer
    from tests.training.test_checkpoint_sharding import _table_params

    run_dir = os.path.join(tmp, phase)
    gin.clear_config()
    cfg = load_config(
        os.path.join(ROOT, "configs", "debug_retrieval.gin"),
        [
            f'DatasetArgs.dataset_path="{os.path.join(tmp, "data", "synthetic")}"',
            "SyntheticDataArgs.num_users=200",
            "DatasetArgs.holdout_validation=True",
            'TrainerArgs.best_metric="NDCG@10"',
            f"TrainerArgs.max_train_iters={STEPS}",
            "TrainerArgs.eval_interval=1",
            f"TrainerArgs.ckpt_save_interval={RESUME_AT}",
            "TrainerArgs.max_eval_iters=1",
            f"TrainerArgs.ema_decay={DECAY}",
            "NetworkArgs.hidden_dropout=0.2",
            f'TrainerArgs.ckpt_save_dir="{os.path.join(run_dir, "ckpt")}"',
            *_table_params({"item": "row_wise"}),
            *extra,
        ],
        task="retrieval",
        world_size=dist.get_world_size(),
    )
    env = init_distributed(cfg.tp.tensor_model_parallel_size)
    set_seed(cfg.trainer.seed)
    return Trainer(cfg, env, run_dir, "")


def _weights(model) -> dict[str, torch.Tensor]:
    """Every table weight whole (assembled from all ranks) and every dense parameter."""
    from hstu.embeddings import embedding_state_dict
    from hstu.training.ema import is_table_weight
    from tests.training.test_checkpoint_sharding import _full

    tables = {k: v for k, v in embedding_state_dict(model).items() if is_table_weight(k)}
    out = {k: v.float() for k, v in _full(tables).items()}
    for name, p in model.dense_module.named_parameters():
        out[f"dense.{name}"] = p.detach().float().clone()
    return out


def _average(trainer) -> dict[str, torch.Tensor]:
    """The trainer's average in the same keys as _weights."""
    ema = trainer.checkpoint.ema
    with ema.swapped():
        return _weights(trainer.model)


def _record(trainer, history: list) -> None:
    step = trainer.train_step

    def recorded(batches):
        loss = step(batches)
        history.append({"w": _weights(trainer.model)})
        return loss

    trainer.train_step = recorded


def _best_saves(trainer) -> dict[int, dict[str, torch.Tensor]]:
    from tests.training.test_checkpoint_sharding import _full

    saved: dict[int, dict[str, torch.Tensor]] = {}
    lifecycle = trainer.checkpoint.best_saves

    def save(step, state, place, _save=lifecycle.save):
        saved[step] = _full(state.sharded["embeddings"])
        return _save(step, state, place)

    lifecycle.save = save
    return saved


def _two(rank: int, world_size: int, tmp: str) -> None:
    trainer = _trainer(tmp, "a")
    history = [{"init": _weights(trainer.model)}]
    averages: dict[int, dict[str, torch.Tensor]] = {}
    _record(trainer, history)
    validation_run = trainer.validation.run

    def run(step, *args, **kwargs):  # the average at every evaluation
        averages[step] = _average(trainer)
        return validation_run(step, *args, **kwargs)

    trainer.validation.run = run
    best = _best_saves(trainer)
    try:
        trainer.train()
    finally:
        trainer.close()
    losses = list(trainer.losses)
    ckpt = os.path.join(tmp, "a", "ckpt", f"iter_{RESUME_AT}")
    resumed = _trainer(tmp, "b", [f'TrainerArgs.ckpt_load_dir="{ckpt}"'])
    resumed_at = resumed.step
    try:
        resumed.train()
    finally:
        resumed.close()
    resumed_final = _average(resumed)
    if rank == 0:
        torch.save(
            {"history": history, "averages": averages, "best": best, "losses": losses,
             "best_step": trainer.checkpoint.best.step, "resumed_at": resumed_at,
             "resumed_losses": list(resumed.losses), "resumed_final": resumed_final},
            os.path.join(tmp, "two.pt"),
        )


def _one(rank: int, world_size: int, tmp: str) -> None:
    from hstu.training.checkpoint_manager import load_weights

    trainer = _trainer(tmp, "c", ["TrainerArgs.ema_decay=0.0"])
    load_weights(trainer.model, os.path.join(tmp, "a", "ckpt", f"iter_{STEPS}"))
    torch.save(_weights(trainer.model), os.path.join(tmp, "one.pt"))
    trainer.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = str(tmp_path_factory.mktemp("ema"))
    run_multiprocess(_two, world_size=2, tmp=tmp)
    run_multiprocess(_one, world_size=1, tmp=tmp)
    out = torch.load(os.path.join(tmp, "two.pt"), weights_only=False)
    out["one"] = torch.load(os.path.join(tmp, "one.pt"), weights_only=False)
    return out


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k, v in a.items():
        assert torch.allclose(v, b[k], rtol=0, atol=1e-6), k


def test_the_average_is_the_one_written_out_over_tables_and_dense(runs) -> None:
    history = runs["history"]
    assert len(history) == STEPS + 1
    assert any(k.startswith("dense.") for k in history[0]["init"])
    assert any("tables." in k for k in history[0]["init"])
    for step in range(1, STEPS + 1):
        want = _expected(history[: step + 1], DECAY)
        _close(runs["averages"][step], want)
        # the raw weights moved away from the average (the test could tell them apart)
        assert any(not torch.allclose(history[step]["w"][k], want[k], atol=1e-6) for k in want)


def test_the_best_checkpoint_holds_the_average_of_its_step(runs) -> None:
    step = runs["best_step"]
    saved = runs["best"][step]
    average = runs["averages"][step]
    tables = [k for k in saved if k in average]
    assert tables
    for k in tables:
        assert torch.allclose(saved[k].float(), average[k], rtol=0, atol=1e-6), k


def test_resume_continues_the_same_average(runs) -> None:
    assert runs["resumed_at"] == RESUME_AT
    assert runs["resumed_losses"] == runs["losses"][RESUME_AT:]
    final = runs["averages"][STEPS]
    for k, v in runs["resumed_final"].items():
        assert torch.equal(v, final[k]), k


def test_weights_only_load_takes_the_average_resharded(runs) -> None:
    _close(runs["one"], runs["averages"][STEPS])


def test_dynamic_tables_are_refused_in_one_line() -> None:
    import gin

    from hstu.config import load_config
    from hstu.validation import ConfigError
    from tests.training.test_pipelines import DYNAMIC_ITEM

    gin.clear_config()
    with pytest.raises(ConfigError, match="ema_decay.*dynamic table 'item'"):
        load_config(
            os.path.join(ROOT, "configs", "debug_retrieval.gin"),
            ['RetrievalArgs.negative_sampling="uniform"', "RetrievalArgs.num_negatives=16",
             "TrainerArgs.ema_decay=0.99", *DYNAMIC_ITEM],
            task="retrieval", world_size=1,
        )
    gin.clear_config()


# ---------------------------------------------- lazy rows of fused tables == the eager average
def _lazy_vs_eager(rank: int, world_size: int, tmp: str, joint: bool) -> None:
    from hstu.args import EmbeddingArgs
    from hstu.embeddings import embedding_state_dict
    from hstu.training import ema as ema_module
    from tests.embeddings.common import DIM, build, kjt, optimizer, train_step

    tbls = [
        EmbeddingArgs(feature_names=["a"], table_name="ta", item_vocab_size_or_capacity=24,
                      sharding_type="model_parallel"),
        EmbeddingArgs(feature_names=["c"], table_name="tc", item_vocab_size_or_capacity=16,
                      sharding_type="model_parallel"),
        EmbeddingArgs(feature_names=["b"], table_name="tb", item_vocab_size_or_capacity=10,
                      sharding_type="data_parallel"),
    ]
    emb, _ = build(tbls, optimizer("rowwise_adagrad"), sharded=True,
                   overrides={"ta": "row_wise", "tc": "row_wise"})
    state = embedding_state_dict(emb)
    if not joint:  # the kernel's tables as if apart in its storage: one average per table
        ema_module._one_view = lambda weights: None
    lazy = WeightAverage({}, state, None, DECAY, model=emb)
    eager = WeightAverage({}, state, None, DECAY)  # every row, every step (the reference)
    # ta and tc share one fused kernel (same dim): both lazy, rows found per table
    assert len(lazy.lazy) == 2 and len(lazy._eager) == 1, (len(lazy.lazy), lazy._eager)
    # joint: the two tables' averages (and counters) are one buffer, caught up in one pass
    shared = lazy.lazy[0].last.untyped_storage().data_ptr() == lazy.lazy[1].last.untyped_storage().data_ptr()
    assert shared == joint
    lazy_rows = _lazy_tables(lazy)  # table -> (its lazy entry, its first row on this rank)
    assert sorted(lazy_rows) == ["ta", "tc"]
    if world_size > 1:  # row-wise: this rank holds a block of each table
        assert lazy_rows["ta"][0].last.numel() == 24 // world_size

    def averages(ema: WeightAverage) -> dict[str, torch.Tensor]:
        with ema.swapped():
            return {k: v.clone() for k, v in _local_weights(emb).items()}

    g = torch.Generator().manual_seed(3)
    raw_before_read = None
    for step in range(40):
        # irregular touches: a few rows of ta, tc only on some steps, repeated ids (every
        # rank draws the same ids: row-wise sharding sends each to the rank holding its row)
        a = torch.randint(0, 24, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(0, 6, (2,), generator=g).tolist() if step % 3 == 0 else []
        b = [step % 10]
        stored = {name: (e.shadow.clone(), e.last.clone()) for name, (e, _) in lazy_rows.items()}
        due = averages(eager)  # after `step` updates: where a row looked up now is caught up to
        train_step(emb, kjt({"a": [a, [a[0]]], "c": [c, []], "b": [b, []]}))
        lazy.update()
        eager.update()
        for name, ids in (("ta", a), ("tc", c)):
            entry, first = lazy_rows[name]
            looked_up = torch.zeros(entry.last.numel(), dtype=torch.bool)
            looked_up[[i - first for i in ids if 0 <= i - first < len(looked_up)]] = True
            # caught up in the forward, before the step changed its weight
            assert (entry.last[looked_up] == step).all(), (name, step)
            torch.testing.assert_close(entry.shadow[looked_up], due[name].view(-1, DIM)[looked_up],
                                       rtol=0, atol=1e-6)
            # every other row: its stored average and update count untouched, bitwise (one
            # exception: apart, a kernel's lookup catches up row 0 of each of its tables)
            kept = ~looked_up
            if not joint:
                kept[0] = False
            shadow_before, last_before = stored[name]
            assert torch.equal(entry.shadow[kept], shadow_before[kept]), (name, step)
            assert torch.equal(entry.last[kept], last_before[kept]), (name, step)
        if step == 17:  # a read in the middle (an evaluation) changes nothing after
            # before it, rows not looked up since their weight changed hold a stale average
            # (not updated until read): the checks above are not vacuous
            want = averages(eager)
            stale = sum(int(((e.shadow - want[name].view(-1, DIM)).abs() > 1e-4).any(1).sum())
                        for name, (e, _) in lazy_rows.items())
            assert stale > 0
            raw_before_read = _local_weights(emb)
            mid_lazy, mid_eager = averages(lazy), averages(eager)
            for k in mid_eager:
                torch.testing.assert_close(mid_lazy[k], mid_eager[k], rtol=0, atol=1e-6)
            for k, v in _local_weights(emb).items():  # the raw weights back, bitwise
                assert torch.equal(v, raw_before_read[k]), k
            for e, _ in lazy_rows.values():  # read: every row caught up
                assert (e.last == lazy.num_updates).all()
    got, want = averages(lazy), averages(eager)
    assert set(got) == {"ta", "tb", "tc"}
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
        if k != "tc" or rank == 0:  # tc's ids (0..5) lie in rank 0's rows
            assert not torch.allclose(got[k], _local_weights(emb)[k], atol=1e-6), k
    for e, _ in lazy_rows.values():
        assert (e.last == lazy.num_updates).all()


def _lazy_tables(ema: WeightAverage) -> dict[str, tuple]:
    """Table name -> (its lazily averaged entry, the table row its first row is)."""
    out = {}
    for entry in ema.lazy:
        for key, (value, parts) in ema.tables.items():
            shards = value.local_shards() if hasattr(value, "local_shards") else None
            for k, part in enumerate(parts):
                if part.data_ptr() == entry.weight.data_ptr() and part.shape == entry.weight.shape:
                    first = shards[k].metadata.shard_offsets[0] if shards else 0
                    out[key.split(".")[-2]] = (entry, first)
    return out


def _local_weights(emb) -> dict[str, torch.Tensor]:
    from hstu.embeddings import embedding_state_dict
    from hstu.training.checkpoint import state_tensors

    out = {}
    for key, value in embedding_state_dict(emb).items():
        if is_table_weight(key):
            out[key.split(".")[-2]] = torch.cat([t.detach().float().flatten() for t in state_tensors(value)]).clone()
    return out


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("joint", [True, False], ids=["one-buffer", "per-table"])
def test_lazy_rows_equal_the_eager_average(tmp_path, joint, world_size) -> None:
    """Fused tables (row-wise sharded) averaged lazily: at each of 40 steps of irregular
    touches, a row looked up is caught up to the eager average (kept here for every row,
    every step) and every other row keeps its stored average bitwise, stale until read; a read
    (swap in, swap out) catches every row up to the eager average, to float32 rounding, and
    leaves the raw weights bitwise and the later average unchanged. Both layouts: the
    kernel's tables' averages in one buffer, and one per table; on 1 and 2 ranks."""
    run_multiprocess(_lazy_vs_eager, world_size=world_size, tmp=str(tmp_path), joint=joint)
