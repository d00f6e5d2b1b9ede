"""What a run saves, and when: one :class:`CheckpointManager` over small stateful parts
(:class:`TableState`, :class:`DenseState`, :class:`LoaderPosition`, the RNG streams, the
:class:`~hstu.training.lifecycle.BestTracker`; docs/training.md, "Checkpoints and resuming").

The manager assembles them into one :class:`~hstu.training.checkpoint.CheckpointState` per
save (the files: :mod:`hstu.training.checkpoint`) and owns the lifecycle of two roots
(:mod:`hstu.training.lifecycle`): the periodic checkpoints under ``ckpt_save_dir`` and the
best one under ``<run_dir>/best``. :func:`load_weights` is the weights-only load
(``hstu.export``, from any world and TP size).

All methods are collective (every rank calls them in the same order).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch

from hstu.training import checkpoint as ckpt
from hstu.training.checkpoint import (
    EMA_TABLES_KEY,
    CheckpointError,
    CheckpointState,
    RankPlace,
    dynamic_state_hint,
)
from hstu.training.distributed import restart_count, rng_state, seed_training_rng, set_rng_state
from hstu.training.ema import WeightAverage, is_table_weight
from hstu.training.lifecycle import AUTO, BestTracker, CheckpointLifecycle

# NetworkArgs fields a checkpoint may be loaded under with another value: they change how
# the function is computed or trained, not the function of the weights
_NETWORK_FREE = frozenset({
    "hidden_dropout", "dtype_str", "kernel_backend", "recompute_input_layernorm",
    "recompute_input_silu", "sequence_layout", "compile",
})


def network_differences(saved: dict[str, Any] | None, network: Any) -> list[str]:
    """``field=saved -> now`` for every NetworkArgs field that changes the model's function
    (two heads of 8 and four heads of 4 have the same tensor shapes, not the same model).
    Empty for a checkpoint written before the network arguments were saved."""
    if not saved:
        return []
    now = dataclasses.asdict(network)
    return [
        f"{name}={saved[name]!r} -> {now[name]!r}"
        for name in sorted(now)
        if name not in _NETWORK_FREE and name in saved and saved[name] != now[name]
    ]


def _state_mismatch(model_state: dict[str, Any], saved: dict[str, Any]) -> str | None:
    """The first key missing on either side or of another shape, as '<key>: ...'."""
    for key, value in model_state.items():
        if key not in saved:
            return f"{key}: missing from the checkpoint{dynamic_state_hint(key)}"
        have, want = getattr(value, "shape", None), getattr(saved[key], "shape", None)
        if have is not None and want is not None and tuple(have) != tuple(want):
            return (f"{key}: {list(want)} in the checkpoint, {list(have)} in this model"
                    f"{dynamic_state_hint(key)}")
    extra = sorted(set(saved) - set(model_state))
    if not extra:
        return None
    return f"{extra[0]}: in the checkpoint, not in this model{dynamic_state_hint(extra[0])}"


def merge_tp_shards(
    shards: list[dict[str, torch.Tensor]], num_heads: int, head_dim: int
) -> dict[str, torch.Tensor]:
    """The dense block's state of every TP rank (rank order) -> the TP=1 state.

    Sharded: ``uvqk.weight``/``uvqk.bias`` (fused U/V/Q/K head layout), ``output.weight``
    (input columns) and the output norm (channels); everything else is replicated.
    """
    from hstu.model.tensor_parallel import unshard_uvqk

    if len(shards) == 1:
        return {k: v for k, v in shards[0].items() if not k.endswith("_extra_state")}
    out = {}
    for key, first in shards[0].items():
        if key.endswith("_extra_state"):
            continue
        parts = [s[key] for s in shards]
        if key.endswith(("uvqk.weight", "uvqk.bias")):
            out[key] = unshard_uvqk(parts, num_heads, head_dim)
        elif key.endswith("output.weight"):
            out[key] = torch.cat(parts, dim=1)
        elif key.endswith(("output_norm_weight", "output_norm_bias")):
            out[key] = torch.cat(parts, dim=0)
        else:
            out[key] = first
    return out


# ------------------------------------------------------------------------------ the parts
class TableState:
    """The embedding tables of ``model.sparse`` (see :mod:`hstu.embeddings.checkpoint`)."""

    KEY = "embeddings"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.ema: WeightAverage | None = None  # TrainerArgs.ema_decay: the tables' average

    def state_dict(self, with_ema: bool = True) -> dict[str, Any]:
        """Live views of the tables (and of their weight average, when the run keeps one
        and ``with_ema``): DCP saves them, or fills them in place on a load."""
        from hstu.embeddings import embedding_state_dict

        out = {self.KEY: embedding_state_dict(self.model)}
        if with_ema and self.ema is not None:
            out[EMA_TABLES_KEY] = self.ema.table_state()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from hstu.embeddings import load_embedding_state_dict

        load_embedding_state_dict(self.model, state[self.KEY])
        if EMA_TABLES_KEY in state and self.ema is not None:
            self.ema.load_table_state(state[EMA_TABLES_KEY])


class DenseState:
    """Dense weights, the dense optimizer, its step count and the loss scale.

    ``dense_tp<r>.pt`` holds ``{"model": {child: state}, "optimizer", "num_steps",
    "loss_scaler"?}``, one entry per top-level child of the dense module; the weights of
    half-precision parameters are their float32 masters.
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any | None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.ema: WeightAverage | None = None  # TrainerArgs.ema_decay: the dense average

    def children(self) -> dict[str, torch.nn.Module]:
        """Top-level submodules other than the embedding tables (those go through DCP)."""
        from hstu.embeddings import EmbeddingsByDim, HstuEmbeddings

        assert isinstance(self.model.sparse, (HstuEmbeddings, EmbeddingsByDim))
        dense = self.model.dense_module
        assert not list(dense.parameters(recurse=False)), "parameters outside the submodules"
        out = dict(dense.named_children())
        for name, child in out.items():
            tables = any(isinstance(m, HstuEmbeddings) for m in child.modules())
            assert not tables, f"model.dense.{name} nests embedding tables (not in model.sparse)"
        return out

    def _master_of(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        return None if self.optimizer is None else self.optimizer.master_of(p)

    def state_dict(self) -> dict[str, Any]:
        weights = {}
        for name, child in self.children().items():
            state = child.state_dict()
            for pname, p in child.named_parameters():
                master = self._master_of(p)
                if master is not None:
                    state[pname] = master.detach().clone()
            weights[name] = state
        opt = self.optimizer
        out = {"model": weights, "optimizer": opt.dense.state_dict(), "num_steps": opt.num_steps}
        if opt.scaler is not None:
            out["loss_scaler"] = opt.scaler.state_dict()
        if self.ema is not None:
            out.update(self.ema.dense_state())
        return out

    def load_weights(self, weights: dict[str, dict[str, Any]], where: str) -> None:
        """The weights only (``weights``: child -> state), checked against this model
        first; the float32 masters take the saved values too."""
        children = self.children()
        if set(children) != set(weights):
            raise CheckpointError(
                f"checkpoint {where} holds modules {sorted(weights)}, this model has "
                f"{sorted(children)}"
            )
        for name, child in children.items():
            problem = _state_mismatch(child.state_dict(), weights[name])
            if problem is not None:
                raise CheckpointError(
                    f"checkpoint {where} does not fit this model: {name}.{problem}"
                )
        masters: dict[int, torch.Tensor] = {}
        for name, child in children.items():
            child.load_state_dict(weights[name])
            for pname, p in child.named_parameters():
                if self._master_of(p) is not None:
                    masters[id(p)] = weights[name][pname].float()
        if self.optimizer is not None:
            self.optimizer.load_masters(masters)


class LoaderPosition:
    """The training loader's position, as it will be after a given step."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.steps_per_epoch = len(loader)
        self.base = loader.state_dict()
        self.base_step = 0  # the step at which the loader stood at ``base``

    def at(self, step: int) -> dict[str, Any]:
        """Loader state after ``step`` (one batch per step)."""
        linear = self.base["epoch"] * self.steps_per_epoch + self.base["batch_index"]
        linear += step - self.base_step
        state = dict(self.base)
        epoch, batch_index = divmod(linear, self.steps_per_epoch)
        state.update(epoch=epoch, batch_index=batch_index)
        return state

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        self.loader.load_state_dict(state)
        self.base = self.loader.state_dict()
        self.base_step = step


# ------------------------------------------------------------------- weights-only load
def split_rows(tables: TableState, sharded: dict[str, Any]) -> dict[str, Any]:
    """Takes the tables' row entries (weights and optimizer states,
    :func:`hstu.embeddings.row_deltas.row_keys`) out of ``sharded`` (a
    :meth:`TableState.state_dict`) and returns them."""
    from hstu.embeddings.row_deltas import row_keys

    state = sharded[TableState.KEY]
    return {k: state.pop(k) for k in row_keys(tables.model, state)}


def load_row_chain(links: tuple[str, list[str]], rows: dict[str, Any], strict: bool) -> None:
    """Fills ``rows`` (:func:`split_rows`) from the whole tables of ``links[0]``, then writes
    each row delta of ``links[1]`` onto them in order (collective). Every key of ``rows`` (of
    any rank) must be in every delta; with ``strict`` a delta may hold no other key (a
    weights-only load has no optimizer state to take)."""
    from hstu.embeddings.row_deltas import apply_entries

    base, deltas = links
    ckpt.load_sharded(base, {TableState.KEY: rows}, allow_unused=True)
    want = set(ckpt.model_keys(rows))  # every rank's: a rank holds its own tables' state
    for delta in deltas:
        files = ckpt.read_rows(delta)
        have: set[str] = set().union(*files)
        missing, extra = sorted(want - have), sorted(have - want)
        if missing or (strict and extra):
            what = (f"lack {missing[0]}, this model has it" if missing else
                    f"hold {extra[0]}, this model does not")
            raise CheckpointError(f"{delta}: its table rows {what} (a different table set?)")
        for entries in files:
            apply_entries(rows, entries)


def load_tables(
    path: str, tables: TableState, place: RankPlace, with_ema: bool = False,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> CheckpointState:
    """The tables of checkpoint ``path`` into the model (and their weight average when
    ``with_ema``), after ``check`` of its meta; returns its files (dense state, meta, rng). A
    row delta's tables are its chain's newest whole ones with the rows of each delta after
    them written on them (:func:`load_row_chain`)."""
    path = ckpt.resolve_checkpoint_dir(path)
    sharded = tables.state_dict(with_ema=with_ema)
    links = ckpt.table_links(path)
    rows = split_rows(tables, sharded) if links is not None else None
    state = ckpt.load_checkpoint(path, sharded, place)
    if check is not None:
        check(state.meta)
    if links is not None and rows is not None:
        load_row_chain(links, rows, strict=True)
        sharded[TableState.KEY].update(rows)
    tables.load_state_dict(sharded)
    return state


def _load_parts(
    path: str, tables: TableState, dense: DenseState, place: RankPlace, task: str, network: Any,
    with_ema: bool = False,
) -> CheckpointState:
    """Tables and dense weights of ``path`` into the model, after the checks (and the
    tables' weight average when ``with_ema``); returns the checkpoint's files (dense
    optimizer and average, meta, rng) for a full resume."""

    def check(meta: dict[str, Any]) -> None:
        if meta.get("task") != task:
            raise CheckpointError(f"checkpoint {path} is a {meta.get('task')} run, this is {task}")
        changed = network_differences(meta.get("network"), network)
        if changed:
            raise CheckpointError(
                f"checkpoint {path} was trained with other NetworkArgs ({', '.join(changed)}); "
                "its weights would compute another function here: load it with the saved "
                "values (its config.gin) or start fresh"
            )

    state = load_tables(path, tables, place, with_ema, check)
    dense.load_weights(state.dense["model"], path)
    return state


def load_weights(model: torch.nn.Module, checkpoint: str, verify: bool = True) -> dict[str, Any]:
    """Weights only, on one process (world 1, TP 1), from a checkpoint of any world and TP
    size: DCP reshards the tables, the dense weights of every TP rank are merged
    (:func:`merge_tp_shards`). Returns the checkpoint's meta. ``verify=False`` when the
    files were checked against the manifest already. Raises CheckpointError."""
    folder = ckpt.resolve_checkpoint_dir(checkpoint)
    if verify:
        ckpt.verify(folder)
    meta = ckpt.read_meta(folder)
    tables = TableState(model)
    sharded = tables.state_dict()
    links = ckpt.table_links(folder)
    rows = split_rows(tables, sharded) if links is not None else None
    averaged = bool(meta.get("ema"))
    assert not (averaged and links), "a run with a weight average writes its tables whole"
    if averaged:  # the run kept a weight average: load it into the weights
        weights = sharded[TableState.KEY]
        sharded[EMA_TABLES_KEY] = {k: weights.pop(k) for k in list(weights) if is_table_weight(k)}
    ckpt.load_sharded(folder, sharded, allow_unused=averaged)  # averaged: not the raw weights
    if averaged:
        sharded[TableState.KEY].update(sharded.pop(EMA_TABLES_KEY))
    if links is not None and rows is not None:
        load_row_chain(links, rows, strict=False)
        sharded[TableState.KEY].update(rows)
    tables.load_state_dict(sharded)
    # averaged: parameters from the average, buffers as saved
    shards = [
        {c: {**d["model"][c], **d["ema"].get(c, {})} for c in d["model"]} if averaged
        else d["model"]
        for d in ckpt.read_dense(folder, list(range(int(meta.get("tp_size", 1)))))
    ]
    heads = head_dim = 0
    if len(shards) > 1:  # only an HSTU block is tensor-parallel
        layer = model.dense_module.block.layers[0]
        heads, head_dim = layer.num_heads, layer.head_dim
    merged = {
        name: merge_tp_shards([s[name] for s in shards], heads, head_dim) for name in shards[0]
    }
    DenseState(model, None).load_weights(merged, folder)
    return meta


# ------------------------------------------------------------------------------ manager
class CheckpointManager:
    """Owns what a run saves (the parts above) and its lifecycle: resume, save, best, prune.

    ``cfg``: the RunConfig; ``env``: the DistEnv; ``run_dir``: the run directory (holds
    ``best/``); ``config_text``: the operative gin configuration, stored in every checkpoint
    (``hstu.export`` rebuilds the model from it).
    """

    def __init__(
        self,
        cfg: Any,
        env: Any,
        model: torch.nn.Module,
        optimizer: Any,
        loader: Any,
        run_dir: str,
        config_text: str,
        log: Callable[[str], None] = print,
    ) -> None:
        args = cfg.trainer
        self.cfg, self.args, self.env, self.place = cfg, args, env, RankPlace.of(env)
        self.run_dir, self.config_text, self.log = run_dir, config_text, log
        self.tables = TableState(model)
        self.dense = DenseState(model, optimizer)
        self.position = LoaderPosition(loader)
        self.best = BestTracker(args.best_metric, args.early_stopping_patience,
                                tolerance=args.best_within_stderr)
        self.periodic = CheckpointLifecycle(args.ckpt_save_dir, args.keep_last_n, log)
        self.best_saves = CheckpointLifecycle(os.path.join(run_dir, "best"), 1, log)
        self.ema: WeightAverage | None = None
        self.loaded: str | None = None
        """The checkpoint folder the run resumed from (None: a fresh start)."""
        self.extra_files: Callable[[str], list[str]] | None = None
        self.budget_steps: int | None = None
        """The step count TrainerArgs.time_budget_minutes chose (saved, kept on resume)."""
        """Further files of every save (:attr:`CheckpointState.extra`; online training)."""
        self.needs: dict[str, int] | None = None
        """The checkpoints the next save needs (:attr:`CheckpointState.needs`; online
        training's deltas)."""
        self.table_rows: dict[str, Any] | None = None
        """This rank's touched table rows for the next save (:attr:`CheckpointState.table_rows`;
        online training's row deltas): its tables' entries are left out of the DCP part."""
        if args.ema_decay > 0:
            self.ema = WeightAverage(
                self.dense.children(), self.tables.state_dict()[TableState.KEY], optimizer,
                args.ema_decay, model=model,
            )
            self.tables.ema = self.dense.ema = self.ema

    # ------------------------------------------------------------------------ resume
    def resume(self) -> int | None:
        """Loads the checkpoint ``TrainerArgs.ckpt_load_dir`` names (after a torchrun restart
        the newest one): the step it is at, or None for a fresh start. Stale folders of
        unfinished saves are removed first."""
        args = self.args
        load_dir = args.ckpt_load_dir
        if not load_dir and restart_count() > 0 and args.ckpt_save_interval > 0:
            # a torchrun restart that started over would lose the run
            self.log(f"[hstu] restart {restart_count()}: resuming from the newest checkpoint")
            load_dir = AUTO
        if args.ckpt_save_interval > 0 or load_dir == AUTO:
            self.periodic.clean_stale()
        self.best_saves.clean_stale()
        path = self.periodic.resolve(load_dir)
        if path is not None:
            return self.load(path)
        if load_dir == AUTO:
            self.log(f"[hstu] no checkpoint in {args.ckpt_save_dir} yet: starting fresh")
        return None

    def load(self, path: str) -> int:
        """Everything of ``path``: weights, optimizers, loader position, RNG, best tracker.
        Returns its step."""
        saved_ema = bool(ckpt.read_meta(ckpt.resolve_checkpoint_dir(path)).get("ema"))
        with_ema = self.ema is not None and saved_ema
        state = _load_parts(
            path, self.tables, self.dense, self.place, self.cfg.task, self.cfg.network,
            with_ema=with_ema,
        )
        self.dense.optimizer.load_dense_state_dict(
            state.dense["optimizer"], int(state.dense["num_steps"]), state.dense.get("loss_scaler")
        )
        if with_ema:
            assert self.ema is not None
            self.ema.load_dense_state(state.dense, path)
        elif self.ema is not None:
            self.ema.restart()
            self.log(
                f"[hstu] {path} has no weight average (TrainerArgs.ema_decay): the average "
                "starts from its weights"
            )
        meta = state.meta
        step = int(meta["step"])
        self.best.load_state_dict(meta.get("best"))
        self.budget_steps = meta.get("budget_steps")
        if meta.get("best_dir") and self.best.step >= 0:
            self.best_saves.root = meta["best_dir"]
        self.periodic.mark_saved(step, path)
        self.position.load_state_dict(meta["data"], step)
        if state.rng is not None:
            set_rng_state(state.rng)
        else:  # this rank did not exist in the saved run: derive its streams from seed and step
            seed_training_rng(
                self.args.seed, self.env, step=step, per_rank=self.args.dropout_per_rank
            )
        self.log(
            f"[hstu] resumed from {path} at step {step} (saved on {meta['world_size']} rank(s))"
        )
        self.loaded = path
        return step

    def load_best_weights(self) -> None:
        """The weights of the best checkpoint (the test split is scored with them)."""
        path = self.best_saves.resolve(self.best_saves.root)
        _load_parts(path, self.tables, self.dense, self.place, self.cfg.task, self.cfg.network)

    @property
    def best_checkpoint(self) -> str:
        """The folder the best checkpoint is (or would be) in."""
        return os.path.join(self.best_saves.root, f"iter_{self.best.step}")

    # -------------------------------------------------------------------------- save
    def state(self, step: int) -> CheckpointState:
        """This rank's part of the checkpoint of ``step``."""
        meta = {
            "step": step,
            "data": self.position.at(step),
            "world_size": self.env.world_size,
            "tp_size": self.place.tp_size,
            "task": self.cfg.task,
            "best": self.best.state_dict(),
            "best_dir": self.best_saves.root,
            "config_text": self.config_text,
            "network": dataclasses.asdict(self.cfg.network),
            "run_dir": os.path.abspath(self.run_dir),
            "ema": self.ema is not None,
            "budget_steps": self.budget_steps,
        }
        sharded = self.tables.state_dict()
        if self.table_rows is not None:
            split_rows(self.tables, sharded)  # the rows travel in table_rows
        return CheckpointState(
            sharded, self.dense.state_dict(), meta, rng_state(), self.extra_files, self.needs,
            self.table_rows,
        )

    def save(self, step: int, best: bool = False) -> str:
        """Writes the checkpoint of ``step`` (into the best root when ``best``), then prunes.
        A periodic save says so on the console. A step already saved under that root (a
        preemption that lands on a save step asks again) returns its path: its state is
        neither gathered nor written a second time."""
        lifecycle = self.best_saves if best else self.periodic
        done = lifecycle.saved_at(step)
        if done is not None:
            return done
        path = lifecycle.save(step, self.state(step), self.place)
        if not best:
            self.log(f"[hstu] step {step}: checkpoint saved to {path}")
        return path
