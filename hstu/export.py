r"""A checkpoint -> a self-contained serving artifact (docs/serving.md).

    python -m hstu.export --ckpt runs/retrieval-.../best --out artifacts/ml-100k-retrieval
    python -m hstu.export --ckpt checkpoints --out art --gin-config-file configs/x.gin \
        --gin-param ...
    # serving/v<step>, and serving/LATEST naming it:
    python -m hstu.export --ckpt checkpoints --out serving --versioned --keep 3

The checkpoint is loaded on one process (world 1, TP 1) from any world and TP size, with
the gin configuration it stores, and the artifact is checked against the trainer's own
evaluation on one batch before it is written: docs/serving.md, "Export".
"""

from __future__ import annotations

import argparse
import csv
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hstu.serving.artifact import (
    AOTI_PACKAGE,
    CACHE_PROGRAMS,
    DENSE_PROGRAM,
    EMBEDDING_DUMP,
    EXIT_BAD_INPUT,
    EXIT_DAMAGED,
    FORMAT,
    FORMAT_VERSION,
    ITEM_MAP,
    MANIFEST,
    TABLES_FILE,
    USER_MAP,
    WEIGHTS_FILE,
    Corpus,
    Tables,
    candidate_logits,
    example_inputs,
    pad_inputs,
)
from hstu.serving.model import InferenceHSTU
from hstu.training.checkpoint_manager import merge_tp_shards

__all__ = [
    "ExportError", "checkpoint_item_vectors", "export", "load_for_export", "main",
    "merge_tp_shards", "publish_version",
]


class ExportError(Exception):
    """A problem the user can fix (printed as one line). ``code``: the exit code, 2 for bad
    input, 3 for a checkpoint or artifact file that cannot be read or written."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


def _cannot_write(exc: OSError, out: str | Path) -> ExportError:
    """One line for a failed write of the artifact (read-only, permission, disk full)."""
    name = exc.filename or str(out)
    code = errno.errorcode.get(exc.errno, exc.errno) if exc.errno is not None else "?"
    return ExportError(
        f"--out {out}: cannot write {name}: {exc.strerror or exc} ({code}); give a writable folder "
        "with free space",
        EXIT_DAMAGED,
    )


# ----------------------------------------------------------------------- checkpoint side


def find_config(ckpt: str, meta: dict[str, Any]) -> tuple[str, str]:
    """(gin text, where it came from) of the run that wrote ``ckpt``."""
    if meta.get("config_text"):
        return meta["config_text"], f"{ckpt}/meta.pt"
    here = Path(ckpt).resolve()
    for folder in [here, *list(here.parents)[:3]]:
        candidate = folder / "operative_config.gin"
        if candidate.is_file():
            return candidate.read_text(), str(candidate)
    raise ExportError(
        f"checkpoint {ckpt} does not hold its configuration and no operative_config.gin was found "
        "above it; pass --gin-config-file (the run's operative_config.gin or its preset)"
    )


def inference_config(model: torch.nn.Module, cfg: Any, info: Any) -> dict[str, Any]:
    """The JSON-able description InferenceHSTU is built from (see hstu.serving.model)."""
    dense = model.dense_module
    block = dense.block
    layer = block.layers[0]
    tb = dense.token_builder
    out: dict[str, Any] = {
        "task": cfg.task,
        "hidden_size": block.hidden_size,
        "num_layers": len(block.layers),
        "num_heads": layer.num_heads,
        "head_dim": layer.head_dim,
        "alpha": layer.alpha,
        "norm_eps": layer.norm_eps,
        "norm_affine": layer.input_norm_weight is not None,
        "uvqk_bias": layer.uvqk.bias is not None,
        "output_bias": layer.output.bias is not None,
        "is_causal": layer.is_causal,
        "mask_convention": layer.mask_convention,
        "max_attn_len": layer.max_attn_len,
        "min_full_attn_seq_len": layer.min_full_attn_seq_len,
        "attn_truncation_layers": block.attn_truncation_layers,
        "attn_truncation_len": block.attn_truncation_len,
        "target_group_size": layer.target_group_size,
        "num_position_buckets": block.num_position_buckets,
        "use_position_embedding": block.position_embedding is not None,
        "relative_attention_bias": layer.rab_pos_weights is not None,
        "rab_num_positions": (
            (layer.rab_pos_weights.numel() + 1) // 2 if layer.rab_pos_weights is not None else 0
        ),
        "rab_use_time": layer.rab_ts_weights is not None,
        "rab_query_time": tb.query_time,
        "num_contextual": len(tb.contextual_feature_names),
        "has_action": info.action_feature_name is not None,
        "projections": {name: proj.in_features for name, proj in tb.projections.items()},
        "item_feature_name": tb.item_feature_name,
        "action_feature_name": tb.action_feature_name,
        "contextual_feature_names": list(tb.contextual_feature_names),
        "max_item_seqlen": dense.max_item_seqlen,
    }
    from hstu.model.tokens import max_token_seqlen

    max_tokens = max_token_seqlen(dense.max_item_seqlen, out["num_contextual"], out["has_action"])
    out["scaling_seqlen"] = layer.attn_scaling_seqlen or max_tokens
    if getattr(dense, "decodes_codes", False):  # semantic ids: states feed the code decoder
        from hstu.serving.sid import sid_config

        out.update(l2_norm_eps=0.0, num_items=dense.num_items, min_item_id=dense.min_item_id,
                   sid=sid_config(dense))
    elif cfg.task == "retrieval":
        out.update(
            l2_norm_eps=dense.l2_norm_eps, num_items=dense.num_items, min_item_id=dense.min_item_id
        )
        if dense.query_projection is not None:
            out["query_projection"] = dense.query_projection.out_features
    else:
        out.update(
            head_arch=list(cfg.ranking.prediction_head_arch),
            head_bias=bool(cfg.ranking.prediction_head_bias),
            head_activation=cfg.ranking.prediction_head_act_type,
            num_tasks=cfg.ranking.num_tasks,
        )
    return out


@torch.no_grad()
def gather_tables(
    model: torch.nn.Module, features: list[str], keys: list[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """Every row of the tables behind ``features`` with the ids the model knows them by:
    feature -> {"ids": int64 [R] sorted, "vectors": float32 [R, D]}. Static tables: ids
    0..rows-1; dynamic tables: the ids that hold a slot. Looked up through the sparse module
    (remap + lookup), so sharded tables are gathered the way the model reads them."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from hstu.embeddings import HstuEmbeddings

    where = {  # feature -> (the HstuEmbeddings holding it, its TableSpec)
        feature: (module, spec)
        for module in model.sparse.modules() if isinstance(module, HstuEmbeddings)
        for spec in module.specs.values()
        for feature in spec.feature_names
    }
    out = {}
    for feature in features:
        module, spec = where[feature]
        if spec.dynamic:
            remapper = module.remappers[spec.name]
            ids = torch.sort(remapper.slot_ids[remapper.occupied]).values.cpu()
        else:
            ids = torch.arange(spec.num_rows, dtype=torch.int64)
        parts = []
        for start in range(0, ids.numel(), 65536):
            chunk = ids[start : start + 65536]
            lengths = torch.cat([
                torch.tensor([chunk.numel()] if k == feature else [0], dtype=torch.int64)
                for k in keys
            ])
            kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=chunk, lengths=lengths)
            parts.append(model.sparse.lookup(kjt, frozenset(keys))[feature].values().float().cpu())
        vectors = torch.cat(parts) if parts else torch.zeros(0, spec.embedding_dim)
        out[feature] = {"ids": ids, "vectors": vectors}
    return out


def checkpoint_metrics(ckpt: str, meta: dict[str, Any]) -> dict[str, float]:
    """The evaluation rows of the checkpoint's step in the run's metrics.csv (if found)."""
    run_dir = meta.get("run_dir")
    candidates = [Path(run_dir)] if run_dir else []
    candidates += list(Path(ckpt).resolve().parents)[:3]
    for folder in candidates:
        path = folder / "metrics.csv"
        if path.is_file():
            with open(path) as fh:
                rows = [
                    r for r in csv.DictReader(fh)
                    if r["split"] == "eval" and int(r["step"]) == int(meta["step"])
                ]
            return {r["name"]: float(r["value"]) for r in rows}
    return {}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    import hstu

    out = {"hstu": hstu.__version__, "torch": torch.__version__}
    for dist_name in ("torchrec", "megatron-core", "fbgemm-gpu-cpu", "fbgemm-gpu", "gin-config"):
        try:
            out[dist_name] = md.version(dist_name)
        except md.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- the export


def find_checkpoint(ckpt_arg: str, log: Any = print) -> str:
    """The checkpoint folder ``--ckpt`` names (checked against its manifest), or the newest
    complete one under a save root (damaged ones skipped, each named in one line).
    Raises CheckpointError."""
    from hstu.training.checkpoint import CheckpointError, verify
    from hstu.training.lifecycle import CheckpointLifecycle

    if not os.path.exists(ckpt_arg):
        raise ExportError(f"--ckpt {ckpt_arg}: no such checkpoint folder")
    lifecycle = CheckpointLifecycle(ckpt_arg, log=lambda m: log(m.replace("[hstu]", "[export]")))
    try:
        ckpt = lifecycle.resolve(ckpt_arg)
    except CheckpointError:
        raise CheckpointError(
            f"--ckpt {ckpt_arg}: no complete checkpoint there (no iter_<step> folder whose files "
            "match its manifest)"
        ) from None
    assert ckpt is not None
    if ckpt == ckpt_arg:  # a folder named directly (one found under a root is verified already)
        verify(ckpt)
    return ckpt


def load_for_export(ckpt_arg: str, gin_file: str | None, params: list[str], log: Any = print):
    """(model, cfg, built, checkpoint dir, meta, config source) on a world of 1 process.

    The checkpoint's files are checked against its manifest (sizes and CRC32) first; from a
    save root, damaged checkpoints are skipped and named, as the trainer's resume does."""
    from hstu.config import load_config
    from hstu.training.builder import build_all
    from hstu.training.checkpoint import read_meta
    from hstu.training.checkpoint_manager import load_weights
    from hstu.training.distributed import init_distributed, set_seed

    ckpt = find_checkpoint(ckpt_arg, log)
    meta = read_meta(ckpt)
    task = meta.get("task")
    if task not in ("retrieval", "ranking"):
        raise ExportError(f"checkpoint {ckpt}: unknown task {task!r} in meta.pt")
    with tempfile.TemporaryDirectory() as tmp:
        if gin_file is None:
            text, source = find_config(ckpt, meta)
            gin_file = os.path.join(tmp, "operative_config.gin")
            Path(gin_file).write_text(text)
        else:
            source = gin_file
        overrides = [
            "TensorModelParallelArgs.tensor_model_parallel_size=1",
            'TrainerArgs.ckpt_load_dir=""',
            *params,
        ]
        cfg = load_config(gin_file, overrides, task=task, world_size=1)
    from hstu.data.sizes import resolve_sizes

    cfg = resolve_sizes(cfg)  # "auto" sizes from the dataset, as the entry points do
    if cfg.network.architecture not in ("hstu", "sasrec", "hstu_sid"):
        raise ExportError(
            f"NetworkArgs.architecture={cfg.network.architecture!r}: only HSTU, SASRec and "
            "semantic-id (hstu_sid) models export"
        )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key, None)
    env = init_distributed(1)
    set_seed(cfg.trainer.seed)
    built = build_all(cfg, env, log=lambda *a, **k: None)
    model = built.model
    model.eval()
    load_weights(model, ckpt, verify=False)  # verified by find_checkpoint
    return model, cfg, built, ckpt, meta, source


def _first_eval_batch(built: Any):
    loader = built.test_loader or built.eval_loader
    state = loader.state_dict()
    state.update(epoch=0, batch_index=0)
    loader.load_state_dict(state)
    return next(iter(loader))


def _batch_inputs(batch: Any, tables: dict[str, dict[str, torch.Tensor]], icfg: dict[str, Any]):
    """A trainer batch -> the padded inputs of the inference model (for the self-check)."""
    item = batch.features[icfg["item_feature_name"]]
    lengths = item.lengths()
    per_user_items = list(item.values().split(lengths.tolist()))
    per_user_ts = list(batch.timestamps.split(lengths.tolist()))
    actions = None
    if icfg["has_action"]:
        act = batch.features[icfg["action_feature_name"]]
        actions = list(act.values().split(act.lengths().tolist()))
    contextual = None
    if icfg["num_contextual"]:
        contextual = torch.stack(
            [batch.features[n].values() for n in icfg["contextual_feature_names"]], 1
        )
    num_candidates = batch.num_candidates
    if num_candidates is None:
        num_candidates = torch.zeros_like(lengths)
    return pad_inputs(Tables(tables), icfg, per_user_items, per_user_ts, num_candidates, actions,
                      contextual, batch.query_timestamps)


@torch.no_grad()
def _sid_item_inputs(dense: Any, tables: dict, icfg: dict) -> None:
    """A semantic-id model's item table in the artifact: each item id's input vector, the sum
    of its code rows (plus its id row where the model adds it; zeros for ids without codes),
    as the trainer builds it per lookup; the code table itself is not needed beside it."""
    from hstu.model.sid import code_rows, sid_feature_name

    item = icfg["item_feature_name"]
    code_table = tables.pop(sid_feature_name(item))["vectors"]
    codes = dense.codes.cpu()
    have = (codes >= 0).all(1, keepdim=True)
    rows = code_rows(codes.clamp(min=0), dense.num_codes)
    vectors = code_table[rows].sum(1) * have.to(code_table.dtype)
    if dense.item_embedding:
        own = tables[item]
        assert torch.equal(own["ids"], torch.arange(codes.shape[0])), "a static item table"
        vectors = vectors + own["vectors"] * have.to(code_table.dtype)
    tables[item] = {"ids": torch.arange(codes.shape[0], dtype=torch.int64), "vectors": vectors}


@torch.no_grad()
def _sid_self_check(model: Any, batch: Any, inference: Any, tables: dict, icfg: dict) -> float:
    """A semantic-id artifact against the trainer on one evaluation batch: the same top-10 ids
    by beam search (history excluded); returns the largest difference of their scores."""
    dense = model.dense_module
    queries, history, seg = dense.last_states(batch, model.sparse(batch.features))
    ref = dense.recommend(queries, 10, (seg, history) if dense.eval_exclude_history else None)
    item = batch.features[icfg["item_feature_name"]]
    mine = list(item.values().split(item.lengths().tolist()))
    ids, scores = inference.top_k(inference(*_batch_inputs(batch, tables, icfg)), mine, 10)
    if not torch.equal(ids, ref.items):
        differ = int((ids != ref.items).any(1).sum())
        raise ExportError(f"self-check: the artifact's top-10 ids (beam search) differ from the "
                          f"trainer's for {differ} users")
    found = ref.items >= 0
    return float((scores[found] - ref.scores[found]).abs().max()) if bool(found.any()) else 0.0


@torch.no_grad()
def self_check(model: Any, built: Any, inference: InferenceHSTU, tables: dict, icfg: dict) -> float:
    """Largest difference between the artifact's and the trainer's outputs on one evaluation
    batch (retrieval: top-10 scores, ids must match; ranking: candidate logits)."""
    batch = _first_eval_batch(built)
    if icfg.get("sid"):
        return _sid_self_check(model, batch, inference, tables, icfg)
    inputs = _batch_inputs(batch, tables, icfg)
    out = inference(*inputs)
    if icfg["task"] == "retrieval":
        corpus = Corpus(tables[icfg["item_feature_name"]], icfg)
        item = batch.features[icfg["item_feature_name"]]
        history = list(item.values().split(item.lengths().tolist()))
        ids, scores = corpus.top_k(out, history, 10)
        ref = _live_top_k(model, batch, history) if corpus.ids is not None else \
            model.evaluate(batch, top_k=10)
        if not torch.equal(ids, ref.top_ids):
            differ = int((ids != ref.top_ids).any(1).sum())
            raise ExportError(
                f"self-check: the artifact's top-10 ids differ from the trainer's for {differ} "
                "users"
            )
        return float((scores - ref.top_scores).abs().max())
    batch = model.prepare(batch)
    _, (ref_logits, _) = model(batch)
    logits = candidate_logits(out, inputs[1], inputs[2])
    return float((logits - ref_logits).abs().max())


def _live_top_k(model: Any, batch: Any, history: list[torch.Tensor]) -> Any:
    """The trainer's top-10 over a dynamic item table's live items (the history left out):
    the self-check's reference for an artifact whose corpus is the table's ids."""
    from types import SimpleNamespace

    queries = model.last_queries(batch)[0]
    live = model.live_items()
    vectors = model.dense_module.normalise(model.lookup_items(live))
    scores = queries @ vectors.t()
    for b, h in enumerate(history):
        scores[b, torch.isin(live, h)] = float("-inf")
    top_scores, top = scores.topk(min(10, live.numel()), dim=1)
    return SimpleNamespace(top_ids=live[top], top_scores=top_scores)


class _Forward(torch.nn.Module):
    """A method of InferenceHSTU as the forward of a module (torch.export exports forward)."""

    def __init__(self, model: InferenceHSTU, method: str, num_args: int) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.num_args = num_args

    def forward(self, a0, a1, a2, a3=None, a4=None, a5=None, a6=None):
        args = (a0, a1, a2, a3, a4, a5, a6)[: self.num_args]
        return getattr(self.model, self.method)(*args)


def export_programs(
    inference: InferenceHSTU, icfg: dict[str, Any], out: Path, aoti: bool, log: Any
) -> dict[str, Any]:
    """torch.export of the dense forward (and, for ranking, the cached-history pair);
    AOTInductor package of the forward where it compiles."""
    from torch.export import Dim

    report: dict[str, Any] = {"programs": {}, "aoti": None}
    dims = {
        "B": Dim("batch", min=1, max=1 << 16), "L": Dim("items", min=2, max=1 << 16),
        "W": Dim("history_tokens", min=1, max=1 << 17), "K": Dim("candidates", min=1, max=1 << 16),
    }
    specs = example_inputs(icfg, batch_size=3, slots=5)
    for name, (args, shapes) in specs.items():
        dyn = [
            None if s is None else {i: dims[d] for i, d in enumerate(s) if d is not None}
            for s in shapes
        ]
        ep = torch.export.export(
            _Forward(inference, name, len(args)), tuple(args), dynamic_shapes=tuple(dyn),
            strict=False,
        )
        path = out / (DENSE_PROGRAM if name == "forward" else CACHE_PROGRAMS[name])
        torch.export.save(ep, str(path))
        report["programs"][name] = path.name
        if name == "forward" and aoti:
            start = time.perf_counter()
            try:
                from torch._inductor import aoti_compile_and_package

                aoti_compile_and_package(ep, package_path=str(out / AOTI_PACKAGE))
                seconds = round(time.perf_counter() - start, 1)
                report["aoti"] = {"package": AOTI_PACKAGE, "compile_s": seconds}
                log(f"[export] AOTInductor package compiled in {time.perf_counter() - start:.0f}s")
            except Exception as exc:  # noqa: BLE001 - the torch.export program stays the artifact
                reason = " ".join(str(exc).split())[:300]
                report["aoti"] = {"error": f"{type(exc).__name__}: {reason}"}
                log(
                    f"[export] AOTInductor did not compile ({type(exc).__name__}: {reason}); "
                    "keeping the torch.export program"
                )
    return report


class StreamMaps:
    """The id maps of an online checkpoint (hstu.data.stream.save_stream): the raw id of dense
    id 1, 2, ... of the stream's items and users, cut to the sizes its ``stream.json`` recorded
    (as a resume loads them; a delta checkpoint's through its chain, whose links are checked
    against their manifests first)."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        from hstu.data.errors import DataError
        from hstu.data.stream.core import ITEM_IDS_FILE, HashedIds, IdMap, load_id_maps
        from hstu.training.online_checkpoints import chain_links

        folder = Path(ckpt_dir)
        self.windows: int | None = None
        links: list[str] = []
        online = folder / "online.json"
        if online.is_file():
            self.windows = int(json.loads(online.read_text())["windows"])
            links = chain_links(str(folder))  # a delta checkpoint: its base and deltas before
            from hstu.training.checkpoint import chain_problem

            problem = chain_problem(str(folder))
            if problem is not None:
                raise ExportError(f"{problem}: the stream's id maps cannot be rebuilt",
                                  EXIT_DAMAGED)
        # hashed ids are whole in every checkpoint (a dense delta holds item_ids.delta.npy)
        items = folder / ITEM_IDS_FILE
        self.hashed = items.is_file() and _hashed_ids(items)
        self.items, self.users = (HashedIds(n, keep_names=True) if self.hashed else IdMap(n)
                                  for n in ("item", "user"))
        try:
            load_id_maps(folder, self.users, self.items, links)
        except DataError as exc:
            raise ExportError(f"{exc} (the stream's id maps of {folder})", EXIT_DAMAGED) from None

    @staticmethod
    def present(ckpt_dir: str | Path) -> bool:
        """Whether ``ckpt_dir`` is an online checkpoint (it holds the stream's state)."""
        from hstu.data.stream.core import STATE_FILE

        return (Path(ckpt_dir) / STATE_FILE).is_file()

    def describe(self) -> dict[str, Any]:
        return {"ids": "hashed" if self.hashed else "dense", "num_items": len(self.items),
                "num_users": len(self.users), "item_id_kind": self.items.kind,
                "user_id_kind": self.users.kind, "windows": self.windows}

    def write(self, out: Path, item_keys: Any = None) -> bool:
        """item_map.parquet (item_id 1..K, raw_item_id) and user_map.parquet (user_id 1..U,
        raw_user_id) of the stream's maps; hashed ids: the item map of the keys ``item_keys``
        (the item table's ids) alone (no user map: nothing maps users). Returns whether a
        user map was written."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        from hstu.columns import USER_FEATURE

        if self.hashed:
            keys = np.asarray(item_keys, dtype=np.int64)
            keys = keys[keys >= 1]
            raw = self.items.raw(keys)
            text = raw.dtype.kind in "US"
            pq.write_table(pa.table({
                "item_id": pa.array(keys),
                "raw_item_id": pa.array(raw.tolist() if text else raw.astype(np.int64),
                                        type=pa.string() if text else pa.int64()),
            }), out / ITEM_MAP)
            return False

        for idmap, file, column in ((self.items, ITEM_MAP, "item_id"),
                                    (self.users, USER_MAP, USER_FEATURE)):
            keys = idmap.state_dict()["keys"]
            raw = pa.array(keys.tolist() if keys.dtype.kind in "US" else keys.astype(np.int64),
                           type=pa.string() if keys.dtype.kind in "US" else pa.int64())
            dense = pa.array(np.arange(1, len(keys) + 1, dtype=np.int64))
            pq.write_table(pa.table({column: dense, f"raw_{column}": raw}), out / file)
        return True


def _hashed_ids(path: Path) -> bool:
    """Whether a checkpoint's item id file holds hashed ids (hstu.data.stream.HashedIds)."""
    import numpy as np

    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot read the stream's item ids ({type(exc).__name__}: "
                          f"{exc})", EXIT_DAMAGED) from None
    return table.ndim == 2 and len(table) > 0 and str(table[0, 0]) == "hashed"


def _copy_item_map(cfg: Any, out: Path) -> bool:
    path = getattr(cfg.dataset, "resolved_path", None)
    if path and (Path(path) / ITEM_MAP).is_file():
        shutil.copy(Path(path) / ITEM_MAP, out / ITEM_MAP)
        return True
    return False


def _item_rows(tables: dict, icfg: dict, item_map: Any) -> tuple[Any, Any, list | None]:
    """(model ids int64 [N], float32 vectors [N, D], raw ids or None) of the item table's rows
    that are items: ids from min_item_id on (and in the item map, when there is one)."""
    import numpy as np

    item = tables[icfg["item_feature_name"]]
    ids, vectors = item["ids"].numpy(), item["vectors"].numpy().astype(np.float32)
    keep = ids >= icfg.get("min_item_id", 0)
    if icfg.get("min_item_id", 0) > 0 and item_map is not None:
        keep &= np.isin(ids, item_map.column("item_id").to_numpy())
    ids, vectors = ids[keep], vectors[keep]
    if item_map is None:
        return ids, vectors, None
    lookup = dict(zip(item_map.column("item_id").to_pylist(),
                      item_map.column("raw_item_id").to_pylist()))
    return ids, vectors, [lookup.get(int(i)) for i in ids]


def checkpoint_item_vectors(ckpt: str, log: Any = print) -> tuple[Any, Any, str]:
    """(item ids, float32 vectors [N, D], checkpoint folder) of a checkpoint's item table,
    loaded on one process as the export does (the configuration from the checkpoint): raw ids
    when the dataset has an item map (rows without a raw id left out), else the model's ids
    from min_item_id on. The collaborative vectors the semantic-id tokenizer reads
    (``python -m hstu.sid.tokenize --ckpt``)."""
    import numpy as np
    import pyarrow.parquet as pq

    from hstu.training.distributed import destroy_distributed

    try:
        model, cfg, built, ckpt_dir, _, _ = load_for_export(ckpt, None, [], log)
        if cfg.network.architecture == "sasrec":
            from hstu.model import sasrec

            icfg = sasrec.inference_config(model, cfg, built.info)
        else:
            icfg = inference_config(model, cfg, built.info)
        keys = list(_first_eval_batch(built).features.keys())
        tables = gather_tables(model, [icfg["item_feature_name"]], keys)
        path = getattr(cfg.dataset, "resolved_path", None)
        m = pq.read_table(Path(path) / ITEM_MAP) if path and (Path(path) / ITEM_MAP).is_file() \
            else None
        ids, vectors, raw = _item_rows(tables, icfg, m)
        if raw is not None:
            known = np.asarray([r is not None for r in raw], dtype=bool)
            kind = "O" if any(isinstance(r, str) for r in raw) else "int64"
            ids = np.asarray([r for r, k in zip(raw, known) if k], dtype=kind)
            vectors = vectors[known]
        return ids, vectors, ckpt_dir
    finally:
        destroy_distributed()


def write_embedding_dump(tables: dict, icfg: dict, out: Path) -> None:
    """items.parquet: item_id (the model's id), raw_item_id (when the dataset has a map), vector."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    m = pq.read_table(out / ITEM_MAP) if (out / ITEM_MAP).is_file() else None
    ids, vectors, raw = _item_rows(tables, icfg, m)
    columns: dict[str, Any] = {"item_id": pa.array(ids)}
    if raw is not None:
        columns["raw_item_id"] = pa.array(raw)
    dim = vectors.shape[1]
    columns["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    pq.write_table(pa.table(columns), out / EMBEDDING_DUMP)


def export(
    ckpt: str, out: str, gin_file: str | None = None, params: list[str] = (), aoti: bool = True,
    log: Any = print, publish_info: dict[str, Any] | None = None,
) -> Path:
    """Writes the artifact of checkpoint ``ckpt`` to ``out``. An online checkpoint (one with the
    stream's files) carries the stream's id maps: the artifact's item and user maps are the
    stream's, and only the items the stream has seen are recommended. ``publish_info``: kept in
    the manifest as ``publish`` (the publisher's gate figures)."""
    from hstu.serving.versions import is_versioned_root
    from hstu.training.distributed import destroy_distributed

    start = time.perf_counter()
    out_path = Path(out)
    if is_versioned_root(out_path):  # replacing it would remove every version (and LATEST)
        raise ExportError(f"--out {out}: a versioned serving root (v<step> folders, LATEST); "
                          "publish into it with --versioned")
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        try:  # before the work: an unwritable --out is said at once
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise _cannot_write(exc, out_path) from None
        loaded = load_for_export(ckpt, gin_file, list(params), log)
        model, cfg, built, ckpt_dir, meta, source = loaded
        log(
            f"[export] {cfg.task} checkpoint {ckpt_dir} (step {meta['step']}, saved on "
            f"{meta.get('world_size')} process(es), TP {meta.get('tp_size', 1)}); "
            f"configuration from {source}"
        )
        info = built.info
        if cfg.network.architecture == "sasrec":  # its own padded module (hstu.model.sasrec)
            from hstu.model import sasrec

            try:
                icfg = sasrec.inference_config(model, cfg, info)
            except ValueError as exc:
                raise ExportError(str(exc)) from None
            inference_cls: Any = sasrec.SASRecInference
        else:
            icfg, inference_cls = inference_config(model, cfg, info), InferenceHSTU
        keys = list(_first_eval_batch(built).features.keys())
        features = [icfg["item_feature_name"], *icfg["contextual_feature_names"]]
        if icfg["has_action"]:
            features.append(icfg["action_feature_name"])
        if icfg.get("sid"):
            from hstu.model.sid import sid_feature_name
            from hstu.serving.sid import InferenceSid

            inference_cls = InferenceSid
            features.append(sid_feature_name(icfg["item_feature_name"]))
        tables = gather_tables(model, features, keys)
        if icfg.get("sid"):
            _sid_item_inputs(model.dense_module, tables, icfg)
        icfg["feature_dims"] = {name: int(t["vectors"].shape[1]) for name, t in tables.items()}
        if cfg.task == "retrieval" and _dynamic(model, icfg["item_feature_name"]):
            # the corpus is the ids the item table's rows hold (hstu.serving.artifact.Corpus)
            icfg["corpus"] = "table"
        inference = inference_cls(icfg)
        inference.load_state_dict({
            k: v.float() if v.is_floating_point() else v  # (a semantic-id model's codes: int64)
            for k, v in model.dense_module.state_dict().items()
            if not k.endswith("_extra_state")
        })
        inference.eval()
        diff = self_check(model, built, inference, tables, icfg)
        log(f"[export] self-check on one evaluation batch: max |artifact - trainer| = {diff:.2e}")
        if diff > 1e-4:
            raise ExportError(
                f"self-check failed: the artifact differs from the trainer by {diff:.2e}"
            )
        stream = StreamMaps(ckpt_dir) if StreamMaps.present(ckpt_dir) else None
        if stream is not None:
            _limit_to_stream(icfg, stream, ckpt_dir, log)
        try:
            write_artifact(tmp, out_path, tables, inference, icfg, aoti, cfg, info, ckpt_dir, meta,
                           source, diff, log, stream=stream, publish_info=publish_info)
        except OSError as exc:
            raise _cannot_write(exc, out_path) from None
        except RuntimeError as exc:  # torch.save's zip writer wraps the OSError of a short write
            if "PytorchStreamWriter failed" not in str(exc) and "inline_container" not in str(exc):
                raise
            short = OSError(errno.EIO, " ".join(str(exc).split())[:160])
            raise _cannot_write(short, out_path) from None
        log(f"[export] artifact written to {out_path} in {time.perf_counter() - start:.0f}s")
        return out_path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # what a failed export left (gone after the rename)
        destroy_distributed()


def _dynamic(model: torch.nn.Module, feature: str) -> bool:
    """Whether ``feature``'s table is dynamic (its rows hold ids: DynamicEmbeddingArgs)."""
    from hstu.embeddings import HstuEmbeddings

    return any(spec.dynamic and feature in spec.feature_names
               for m in model.sparse.modules() if isinstance(m, HstuEmbeddings)
               for spec in m.specs.values())


def _limit_to_stream(icfg: dict[str, Any], stream: StreamMaps, ckpt_dir: str, log: Any) -> None:
    """Retrieval ranks the items the stream has seen (dense ids 1..K), as the online loop's
    evaluation does; the table's rows beyond them were never trained. Hashed ids: the items
    the dynamic item table holds (the corpus is the table's)."""
    if stream.hashed:
        log(f"[export] online checkpoint with hashed ids: the item map is the {stream.items.kind} "
            "ids of the item table's rows")
        return
    known = len(stream.items)
    if icfg["task"] == "retrieval":
        if known + 1 > int(icfg["num_items"]):
            raise ExportError(
                f"{ckpt_dir}: the stream knows {known} items, more than the item table's "
                f"{int(icfg['num_items']) - 1}; the checkpoint does not fit its configuration"
            )
        icfg["num_items"] = known + 1
    log(f"[export] online checkpoint: the stream's id maps ({known} items, "
        f"{len(stream.users)} users) are the artifact's item and user maps")


def _copy_user_map(cfg: Any, icfg: dict[str, Any], out: Path) -> bool:
    """user_map.parquet (user_id, raw_user_id) when the model reads the user id: recommend maps
    an events file's raw user ids to the model's through it."""
    import pyarrow.parquet as pq

    from hstu.columns import USER_FEATURE

    path = getattr(cfg.dataset, "resolved_path", None)
    if USER_FEATURE not in icfg["contextual_feature_names"] or not path:
        return False
    sequences = Path(path) / "sequences.parquet"
    if not sequences.is_file() or "raw_user_id" not in pq.read_schema(sequences).names:
        return False
    pq.write_table(pq.read_table(sequences, columns=[USER_FEATURE, "raw_user_id"]), out / USER_MAP)
    return True


def write_artifact(tmp: Path, out_path: Path, tables: dict, inference: InferenceHSTU,
                   icfg: dict[str, Any], aoti: bool, cfg: Any, info: Any, ckpt_dir: str,
                   meta: dict[str, Any], source: str, diff: float, log: Any,
                   stream: StreamMaps | None = None,
                   publish_info: dict[str, Any] | None = None) -> None:
    """Writes every file into ``tmp``, the manifest (sizes and CRC32 of the others) last, then
    renames ``tmp`` to ``out_path``."""
    from hstu.training.checkpoint import describe_written_files

    torch.save(tables, tmp / TABLES_FILE)
    torch.save(inference.state_dict(), tmp / WEIGHTS_FILE)
    report = export_programs(inference, icfg, tmp, aoti, log)
    if stream is not None:  # the stream's ids, not the dataset's that sized the tables
        has_user_map = stream.write(tmp, tables[icfg["item_feature_name"]]["ids"].numpy())
        has_map = True
    else:
        has_map = _copy_item_map(cfg, tmp)
        has_user_map = _copy_user_map(cfg, icfg, tmp)
    write_embedding_dump(tables, icfg, tmp)
    dataset = cfg.dataset
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": cfg.task,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "checkpoint": {"path": os.path.abspath(ckpt_dir), "step": int(meta["step"]),
                       "world_size": meta.get("world_size"), "tp_size": meta.get("tp_size", 1),
                       "config_source": source},
        "metrics": checkpoint_metrics(ckpt_dir, meta),
        "dataset": {"name": info.dataset_name, "path": getattr(dataset, "resolved_path", None),
                    "num_items": info.num_items, "first_item_id": info.first_item_id,
                    "max_sequence_length": getattr(dataset, "max_sequence_length", None),
                    "max_num_candidates": getattr(dataset, "max_num_candidates", 0),
                    "item_map": ITEM_MAP if has_map else None,
                    "user_map": USER_MAP if has_user_map else None},
        "features": {
            name: {"rows": int(t["ids"].numel()), "dim": int(t["vectors"].shape[1])}
        for name, t in tables.items()
        },
        "model": icfg,
        "contents": {"tables": TABLES_FILE, "weights": WEIGHTS_FILE, "embeddings": EMBEDDING_DUMP,
                     **report["programs"]},
        # size and CRC32 of every other file, checked before loading (as checkpoints)
        "files": describe_written_files(str(tmp), sorted(p.name for p in tmp.iterdir())),
        "aoti": report["aoti"],
        "self_check_max_abs_diff": diff,
        "stream": stream.describe() if stream is not None else None,
        "publish": publish_info,
        "versions": _versions(),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    shutil.rmtree(out_path, ignore_errors=True)
    os.replace(tmp, out_path)


def publish_version(root: str | Path, ckpt: str, keep: int = 3, gin_file: str | None = None,
                    params: list[str] = (), aoti: bool = True, step: int | None = None,
                    log: Any = print, publish_info: dict[str, Any] | None = None) -> Path:
    """Exports ``ckpt`` as a new version of the versioned serving root ``root`` (``v<step>``,
    step: the checkpoint's unless given) and points ``LATEST`` at it; versions beyond the
    newest ``keep`` are removed (hstu.serving.versions.publish: the rules). Returns the
    version's folder. A training loop calls this with the checkpoint it has just saved."""
    from hstu.serving.versions import VersionError, publish

    def write(staging: Path) -> None:
        export(ckpt, str(staging), gin_file, params, aoti=aoti, log=log,
               publish_info=publish_info)

    try:
        return publish(root, write, step=step, keep=keep, log=log)
    except VersionError as exc:
        raise ExportError(str(exc), exc.code) from None
    except OSError as exc:
        raise _cannot_write(exc, root) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hstu.export",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint folder, or a save root with a 'latest' file")
    parser.add_argument("--out", required=True,
                        help="artifact folder to write (replaced if it exists); with --versioned, "
                             "the versioned root")
    parser.add_argument("--gin-config-file", default=None,
                        help="configuration (default: the checkpoint's run's)")
    parser.add_argument("--gin-param", action="append", default=[], metavar="BINDING",
                        help="extra gin binding, e.g. "
                             "'DatasetArgs.dataset_path=\"tmp_data/ml-100k\"'")
    parser.add_argument("--no-aoti", action="store_true",
                        help="skip the AOTInductor package (minutes on a CPU)")
    parser.add_argument("--versioned", action="store_true",
                        help="--out is a versioned serving root: write the export as v<step> and "
                             "point LATEST at it")
    parser.add_argument("--keep", type=int, default=None, metavar="K",
                        help="with --versioned: versions kept (the newest K; default 3)")
    ns = parser.parse_args(argv)
    if ns.keep is not None and not ns.versioned:
        parser.error("--keep is for --versioned (a versioned serving root)")
    if ns.keep is not None and ns.keep < 1:
        parser.error(f"--keep {ns.keep}: keep at least 1 version")
    from hstu.console import fail, keep_log, quiet_start

    quiet_start()  # known harmless third-party warnings (DCP's ShardedTensor notice) stay off
    keep_log(None)
    from hstu.args import ConfigError
    from hstu.data.errors import DataError
    from hstu.training.checkpoint import CheckpointError

    try:
        if ns.versioned:
            publish_version(
                ns.out, ns.ckpt, ns.keep or 3, ns.gin_config_file, ns.gin_param,
                aoti=not ns.no_aoti,
            )
        else:
            export(ns.ckpt, ns.out, ns.gin_config_file, ns.gin_param, aoti=not ns.no_aoti)
    except ExportError as exc:
        return fail(str(exc), exc.code)
    except (ConfigError, DataError) as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    except CheckpointError as exc:  # damaged, missing or no complete checkpoint
        return fail(str(exc), EXIT_DAMAGED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
