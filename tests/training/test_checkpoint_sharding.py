"""Checkpoints under every sharding the planner can choose, ranking and retrieval.

For each (task, sharding) case, on 2 gloo processes:
- save: periodic checkpoints at steps 2 and 4 and best checkpoints on validation;
- best-checkpoint load: at the end the trainer loads the best checkpoint, and the tables and
  their optimizer state must then equal what that save held;
- exact resume: a second trainer resumes from step 2 and trains to step 4; its losses equal
  the uninterrupted run's and its step-4 checkpoint holds the same tables and optimizer
  state (bitwise);
- reshard 2 -> 1: one process loads the 2-process step-2 checkpoint; every row of every table
  and of its optimizer state equals the saved one (bitwise).
What was saved is recorded by wrapping the checkpoint lifecycles' ``save`` (the state being
written, assembled from every rank's shards and checked to cover each table once), so the
reference does not come from the load path under test.

The starts of the processes (~8 s of imports each) dominate a case's few seconds: one
2-process run trains every case in turn and one 1-process run reshards them all (module
fixture); the tests read what the runs recorded. A case that fails with a CheckpointError
(the same on every rank) records it and the runs go on with the next case.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_multiprocess

# the slow tier (make test-slow, run by CI): the whole matrix is one ~60 s pair of runs; the
# default tier keeps checkpoint loading under sharding in tests/embeddings/test_checkpoint.py
# and tests/training/test_lifecycle.py
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS = ("ranking", "retrieval")
BEST_METRIC = {"ranking": "AUC", "retrieval": "NDCG@10"}
STEPS, RESUME_AT = 4, 2
# gin scope and feature of each table the cases place
SCOPES = {
    "item": ("item", "item_id"), "user_id": ("user", "user_id"), "segment": ("segment", "segment"),
}
# table -> sharding (the others keep the data's defaults: action and segment data_parallel)
CASES = {
    "data_parallel": {"item": "data_parallel", "user_id": "data_parallel"},
    "table_wise": {"item": "table_wise", "user_id": "table_wise"},
    "row_wise": {"item": "row_wise", "user_id": "row_wise"},
    "column_wise": {"item": "column_wise", "user_id": "column_wise"},
    "table_row_wise": {"item": "table_row_wise", "user_id": "table_row_wise"},
    "mixed": {"item": "row_wise", "user_id": "column_wise", "segment": "table_wise"},
}
# Tables of one dim share an EmbeddingCollection and one plan; each dim is planned on its
# own, and a lone table_wise table goes to rank 0. table_wise: item and user_id of the same
# dim (16), so the planner puts them on different ranks. column_wise: TorchRec cuts columns
# into blocks of 128 (MIN_CW_DIM; a multiple of 4 that divides the dim), so a table of dim
# <= 128 is one column shard on one rank (= table_wise); the contextual tables (user_id,
# segment) are 256 wide there, two blocks, one per rank.
WIDE = ["NetworkArgs.contextual_embedding_dim=256"]
CASE_PARAMS = {"column_wise": WIDE, "mixed": WIDE}


@functools.cache
def offered() -> tuple[str, ...]:
    """The sharding types TorchRec's sharder of HSTU's tables offers on CPU."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder

    return tuple(EmbeddingCollectionSharder().sharding_types("cpu"))


def runnable(case: str) -> bool:
    return all(s in offered() for s in CASES[case].values())


NOT_OFFERED = (
    "TorchRec {version}'s EmbeddingCollectionSharder (the sharder of sequence embeddings, "
    "which HSTU's tables are) offers {offered} only, on CPU and GPU alike: the planner cannot "
    "choose {case} for these tables (refused in one line: "
    "test_table_row_wise_is_refused_in_one_line)"
)


def _skip_reason(case: str) -> str:
    import torchrec

    return NOT_OFFERED.format(version=torchrec.__version__, offered=list(offered()), case=case)


# ------------------------------------------------------------------ inside the processes
def _table_params(shardings: dict[str, str]) -> list[str]:
    out = []
    for table, sharding in shardings.items():
        scope, feature = SCOPES[table]
        out += [f'{scope}/EmbeddingArgs.feature_names=["{feature}"]',
                f'{scope}/EmbeddingArgs.table_name="{table}"']
        if sharding == "data_parallel":
            out.append(f'{scope}/EmbeddingArgs.sharding_type="data_parallel"')
        else:
            out += [f'{scope}/EmbeddingArgs.sharding_type="model_parallel"',
                    f'{scope}/EmbeddingArgs.sharding_override="{sharding}"']
    return out


def _trainer(task: str, case: str, tmp: str, phase: str, extra: list[str] = ()):
    import gin

    from hstu.config import load_config
    from hstu.training.distributed import init_distributed, set_seed
    from hstu.training.trainer import Trainer

    run_dir = os.path.join(tmp, f"{task}-{case}", phase)
    gin.clear_config()
    cfg = load_config(
        os.path.join(ROOT, "configs", f"debug_{task}.gin"),
        [
            f'DatasetArgs.dataset_path="{os.path.join(tmp, "data", "synthetic")}"',
            "SyntheticDataArgs.num_users=200",
            "DatasetArgs.holdout_validation=True",
            f'TrainerArgs.best_metric="{BEST_METRIC[task]}"',
            f"TrainerArgs.max_train_iters={STEPS}",
            f"TrainerArgs.eval_interval={RESUME_AT}",
            f"TrainerArgs.ckpt_save_interval={RESUME_AT}",
            "TrainerArgs.max_eval_iters=1",
            f"TrainerArgs.log_interval={STEPS}",
            f'TrainerArgs.ckpt_save_dir="{os.path.join(run_dir, "ckpt")}"',
            *CASE_PARAMS.get(case, []),
            *_table_params(CASES[case]),
            *extra,
        ],
        task=task,
        world_size=dist.get_world_size(),
    )
    env = init_distributed(cfg.tp.tensor_model_parallel_size)
    set_seed(cfg.trainer.seed)
    return Trainer(cfg, env, run_dir, "")


def _full(state: dict) -> dict[str, torch.Tensor]:
    """Every entry of an embedding_state_dict as one whole tensor (collective; on every rank).
    Sharded entries are assembled from all ranks' shards, each element covered exactly once;
    replicated entries must be identical on every rank."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    mine = {}
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            shards = [(list(s.metadata.shard_offsets), s.tensor.detach().clone())
                      for s in value.local_shards()]
            mine[key] = ("sharded", tuple(value.size()), shards)
        else:
            mine[key] = ("replicated", value.detach().clone())
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    out = {}
    for key in sorted(set().union(*every)):
        parts = [part[key] for part in every if key in part]
        if parts[0][0] == "replicated":
            assert len(parts) == len(every), f"{key}: replicated but missing on some rank"
            for other in parts[1:]:
                assert torch.equal(other[1], parts[0][1]), f"{key}: replicas differ"
            out[key] = parts[0][1]
            continue
        size = parts[0][1]
        whole = None
        covered = torch.zeros(size, dtype=torch.int32)
        for _, _, shards in parts:
            for offsets, tensor in shards:
                whole = torch.zeros(size, dtype=tensor.dtype) if whole is None else whole
                where = tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))
                whole[where] = tensor
                covered[where] += 1
        assert whole is not None and bool((covered == 1).all()), f"{key}: not covered once"
        out[key] = whole
    return out


def _placements(trainer) -> list[tuple[str, str, list[int]]]:
    return [(p.table, p.sharding_type, p.ranks) for p in trainer.built.placements]


def _embedding_state(trainer) -> dict[str, torch.Tensor]:
    from hstu.embeddings import embedding_state_dict

    return _full(embedding_state_dict(trainer.model))


def _record_saves(trainer) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    """{"periodic"|"best": {step: the embedding state being written}}, filled as it saves."""
    saved: dict[str, dict[int, dict[str, torch.Tensor]]] = {"periodic": {}, "best": {}}
    manager = trainer.checkpoint
    for kind, lifecycle in (("periodic", manager.periodic), ("best", manager.best_saves)):
        def save(step, state, place, _save=lifecycle.save, _into=saved[kind]):
            _into[step] = _full(state.sharded["embeddings"])
            return _save(step, state, place)

        lifecycle.save = save
    return saved


def _all_losses(trainer) -> list[list[float]]:
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, list(trainer.losses))
    return every


def _result_path(tmp: str, task: str, case: str, phase: str) -> str:
    return os.path.join(tmp, "results", f"{task}-{case}-{phase}.pt")


def _per_rank_keys(rank: int, tmp: str) -> dict:
    """The key check on its own: optimizer state on one rank per table, as TorchRec's fused
    optimizer keeps it for table_wise tables; a real mismatch must still be named."""
    from hstu.training.checkpoint import (
        CheckpointError,
        CheckpointState,
        RankPlace,
        load_checkpoint,
        save_checkpoint,
    )

    def state(value: float, optim: list[str]) -> dict:
        return {"tables": {t: torch.full((3, 2), value) for t in ("a", "b")},
                "optim": {t: torch.full((3,), value) for t in optim}}

    own = ["a"] if rank == 0 else ["b"]
    meta = {"step": 1, "world_size": 2, "tp_size": 1}
    root = os.path.join(tmp, "keys")
    place = RankPlace(rank, 0, rank)
    path = save_checkpoint(root, 1, CheckpointState(state(1.0, own), {}, meta, {}), place)
    loaded = state(0.0, own)
    load_checkpoint(path, loaded, place)
    out = {"loaded": all(bool((v == 1).all()) for part in loaded.values() for v in part.values())}
    for name, optim in (("lacks b", ["a"] if rank == 0 else []), ("has c", own + ["c"])):
        try:
            load_checkpoint(path, state(0.0, optim), place)
            out[name] = None
        except CheckpointError as exc:
            out[name] = str(exc)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, out)
    return every


def _two_processes(rank: int, world_size: int, tmp: str, cases: list[tuple[str, str]]) -> None:
    from hstu.training.checkpoint import CheckpointError

    keys = _per_rank_keys(rank, tmp)
    if rank == 0:
        torch.save(keys, os.path.join(tmp, "results", "keys.pt"))
    for task, case in cases:
        rec: dict = {}
        try:
            trainer = _trainer(task, case, tmp, "a")
            rec["placements"] = _placements(trainer)
            saved = _record_saves(trainer)
            try:
                trainer.train()  # ends by loading the best checkpoint for the test split
            finally:
                trainer.close()
            rec.update(saved=saved, best_step=trainer.checkpoint.best.step,
                       losses=_all_losses(trainer),
                       after_best_load=_embedding_state(trainer))
            del trainer
            ckpt = os.path.join(tmp, f"{task}-{case}", "a", "ckpt", f"iter_{RESUME_AT}")
            resumed = _trainer(task, case, tmp, "b", [f'TrainerArgs.ckpt_load_dir="{ckpt}"'])
            rec["resumed_at"] = resumed.step
            resumed_saves = _record_saves(resumed)
            try:
                resumed.train()
            finally:
                resumed.close()
            rec.update(resumed_saved=resumed_saves, resumed_losses=_all_losses(resumed))
            del resumed
        except CheckpointError as exc:  # agreed: every rank raises it at the same point
            rec["error"] = str(exc)
        if rank == 0:
            torch.save(rec, _result_path(tmp, task, case, "two"))


def _one_process(rank: int, world_size: int, tmp: str, cases: list[tuple[str, str]]) -> None:
    from hstu.training.checkpoint import CheckpointError
    from hstu.validation import ConfigError

    for task, case in cases:
        rec: dict = {}
        ckpt = os.path.join(tmp, f"{task}-{case}", "a", "ckpt", f"iter_{RESUME_AT}")
        try:
            trainer = _trainer(task, case, tmp, "c", [f'TrainerArgs.ckpt_load_dir="{ckpt}"'])
            rec.update(placements=_placements(trainer),
                       loaded_step=trainer.step, state=_embedding_state(trainer))
            trainer.close()
        except CheckpointError as exc:
            rec["error"] = str(exc)
        torch.save(rec, _result_path(tmp, task, case, "one"))
    if ("ranking", "column_wise") in cases:  # saved column_wise, loaded row_wise
        ckpt = os.path.join(tmp, "ranking-column_wise", "a", "ckpt", f"iter_{RESUME_AT}")
        changed = None
        try:
            _trainer("ranking", "column_wise", tmp, "changed", [
                f'TrainerArgs.ckpt_load_dir="{ckpt}"',
                'user/EmbeddingArgs.sharding_override="row_wise"',
                'item/EmbeddingArgs.sharding_override="row_wise"',
            ]).close()
        except CheckpointError as exc:
            changed = str(exc)
        torch.save({"changed": changed}, _result_path(tmp, "ranking", "column_wise", "changed"))
    if ("ranking", "table_wise") in cases:  # saved table_wise, loaded row_wise: resharded
        ckpt = os.path.join(tmp, "ranking-table_wise", "a", "ckpt", f"iter_{RESUME_AT}")
        trainer = _trainer("ranking", "table_wise", tmp, "rw", [
            f'TrainerArgs.ckpt_load_dir="{ckpt}"',
            'user/EmbeddingArgs.sharding_override="row_wise"',
            'item/EmbeddingArgs.sharding_override="row_wise"',
        ])
        torch.save({"placements": _placements(trainer), "state": _embedding_state(trainer)},
                   _result_path(tmp, "ranking", "table_wise", "as_row_wise"))
        trainer.close()
    if "table_row_wise" not in offered():
        refused = None
        try:
            _trainer("ranking", "table_row_wise", tmp, "refused").close()
        except ConfigError as exc:
            refused = str(exc)
        torch.save({"refused": refused}, _result_path(tmp, "ranking", "table_row_wise", "refused"))


# ------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> str:
    tmp = str(tmp_path_factory.mktemp("ckpt_sharding"))
    os.makedirs(os.path.join(tmp, "results"))
    cases = [(task, case) for task in TASKS for case in CASES if runnable(case)]
    run_multiprocess(_two_processes, world_size=2, tmp=tmp, cases=cases)
    run_multiprocess(_one_process, world_size=1, tmp=tmp, cases=cases)
    return tmp


def _result(request, task: str, case: str, phase: str) -> dict:
    """What the runs recorded for a case (skipped, before the runs start, if not runnable)."""
    if not runnable(case):
        pytest.skip(_skip_reason(case))
    runs = request.getfixturevalue("runs")
    rec = torch.load(_result_path(runs, task, case, phase), weights_only=False)
    assert "error" not in rec, rec["error"]
    return rec


def _assert_equal_states(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: keys differ"
    for key, value in want.items():
        assert got[key].shape == value.shape, f"{what}: {key} {got[key].shape} vs {value.shape}"
        assert torch.equal(got[key], value), f"{what}: {key} differs"


def _check_placements(placements: list, case: str, world: int) -> None:
    by_table = {table: (sharding, ranks) for table, sharding, ranks in placements}
    for table, sharding in CASES[case].items():
        assert by_table[table][0] == sharding, f"{table}: {by_table[table]}"
    if world == 1:
        assert all(ranks == [0] for _, ranks in by_table.values()), by_table
        return
    if case == "table_wise":  # the case of the bug: each rank holds its own table
        assert {tuple(by_table["item"][1]), tuple(by_table["user_id"][1])} == {(0,), (1,)}, by_table
    if case in ("row_wise", "data_parallel"):
        assert by_table["item"][1] == by_table["user_id"][1] == [0, 1], by_table
    if case in ("column_wise", "mixed"):  # two column blocks of 128, one per rank
        assert by_table["user_id"][1] == [0, 1], by_table


PARAMS = [pytest.param(task, case, id=f"{task}-{case}") for task in TASKS for case in CASES]


@pytest.mark.parametrize("task,case", PARAMS)
def test_save_and_load_the_best_checkpoint(request, task, case) -> None:
    rec = _result(request, task, case, "two")
    _check_placements(rec["placements"], case, world=2)
    saved = rec["saved"]
    assert sorted(saved["periodic"]) == [RESUME_AT, STEPS]
    assert rec["best_step"] in saved["best"], (rec["best_step"], sorted(saved["best"]))
    state = saved["best"][rec["best_step"]]
    assert any(".optim." in k for k in state) != (case == "data_parallel")  # fused state saved
    _assert_equal_states(rec["after_best_load"], state, "after loading the best checkpoint")


@pytest.mark.parametrize("task,case", PARAMS)
def test_resume_is_bit_exact(request, task, case) -> None:
    rec = _result(request, task, case, "two")
    assert rec["resumed_at"] == RESUME_AT
    full, resumed = rec["losses"], rec["resumed_losses"]
    assert all(len(r) == STEPS for r in full) and all(len(r) == STEPS - RESUME_AT for r in resumed)
    for rank, (a, b) in enumerate(zip(full, resumed)):
        assert b == a[RESUME_AT:], f"rank {rank}: resumed {b} != uninterrupted {a[RESUME_AT:]}"
    _assert_equal_states(rec["resumed_saved"]["periodic"][STEPS], rec["saved"]["periodic"][STEPS],
                         f"step {STEPS} after the resume")


@pytest.mark.parametrize("task,case", PARAMS)
def test_reshard_two_processes_to_one(request, task, case) -> None:
    one = _result(request, task, case, "one")
    _check_placements(one["placements"], case, world=1)
    assert one["loaded_step"] == RESUME_AT
    two = _result(request, task, case, "two")
    _assert_equal_states(one["state"], two["saved"]["periodic"][RESUME_AT], "loaded on 1 process")


def test_table_row_wise_is_refused_in_one_line(runs) -> None:
    if "table_row_wise" in offered():
        pytest.skip("TorchRec offers table_row_wise for these tables: the matrix runs it")
    refused = torch.load(_result_path(runs, "ranking", "table_row_wise", "refused"))["refused"]
    assert refused is not None, "a table_row_wise override was accepted"
    assert "\n" not in refused
    assert "EmbeddingArgs.sharding_override: table 'item'" in refused
    assert "does not offer 'table_row_wise'" in refused and "row_wise" in refused


def test_per_rank_keys_are_checked_against_their_union(runs) -> None:
    every = torch.load(os.path.join(runs, "results", "keys.pt"))
    for rank, out in enumerate(every):
        assert out["loaded"], f"rank {rank}: the values were not loaded"
        lacks, extra = out["lacks b"] or "", out["has c"] or ""
        assert lacks.endswith("the checkpoint has optim.b, this model does not (a different "
                              "table set?)"), f"rank {rank}: {out['lacks b']}"
        assert extra.endswith("this model has optim.c, the checkpoint does not (a different "
                              "table set?)"), f"rank {rank}: {out['has c']}"


def test_changing_a_column_wise_table_s_sharding_is_named(runs) -> None:
    if not runnable("column_wise"):
        pytest.skip(_skip_reason("column_wise"))
    changed = torch.load(_result_path(runs, "ranking", "column_wise", "changed"))["changed"]
    # rowwise_adagrad's state: one entry per row and column block (2 blocks of 128)
    assert changed is not None and "\n" not in changed, changed
    assert "user_id.momentum1 is [402] in the checkpoint, [201] in this model" in changed, changed
    assert "load it with the sharding_override and dim it was saved with" in changed, changed


def test_table_wise_checkpoint_loads_as_row_wise(request, runs) -> None:
    two = _result(request, "ranking", "table_wise", "two")
    rw = torch.load(_result_path(runs, "ranking", "table_wise", "as_row_wise"))
    assert {t: k for t, k, _ in rw["placements"]}["item"] == "row_wise"
    _assert_equal_states(rw["state"], two["saved"]["periodic"][RESUME_AT], "loaded row_wise")
