"""Build the embedding tables of a run: one TorchRec EmbeddingCollection behind one module.

Legend: B batch, F features, L[f][b] jagged lengths, N[f] = sum_b L[f][b] ids of feature
f, D[t] embedding dim of table t, C[t] rows of table t.

Static tables (``EmbeddingArgs``) become tables of ``item_vocab_size_or_capacity`` rows;
ids must lie in [0, rows). Dynamic tables (``DynamicEmbeddingArgs``) become tables of
their resolved capacity (``resolve_hbm``) fronted by a :class:`DynamicIdRemapper` that
turns raw int64 ids into rows. Both live in the same ``EmbeddingCollection`` so one
TorchRec sharding plan covers them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from hstu.args import DynamicEmbeddingArgs, EmbeddingArgs
from hstu.embeddings.dynamic import HOST_REMAP, DynamicIdRemapper, default_bound, fresh_rows
from hstu.sync_audit import allowed_sync

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TableSpec:
    """What was built for one table."""

    name: str
    feature_names: tuple[str, ...]
    num_rows: int
    embedding_dim: int
    dynamic: bool
    sharding_type: str
    """data_parallel | model_parallel, as declared."""
    caching: bool = False
    """Dynamic table with a UVM cache in front (GPU only)."""
    cache_rows: int = 0
    """Rows of the device cache when caching."""
    sketch_bytes: int = 0
    """Host bytes of a dynamic table's admission sketch on every rank (0: no admission)."""


class MergeLookups(nn.Module):
    """dicts of feature -> JaggedTensor -> one dict (a module so that fx tracing keeps it a
    leaf)."""

    def forward(self, *parts: dict[str, JaggedTensor]) -> dict[str, JaggedTensor]:
        out: dict[str, JaggedTensor] = {}
        for part in parts:
            out.update(part)
        return out


def apply_misses(
    embeddings: dict[str, JaggedTensor], misses: dict[str, torch.Tensor] | None
) -> dict[str, JaggedTensor]:
    """Zeroes the looked-up rows of ids that a dynamic table does not hold."""
    if not misses:
        return embeddings
    out = dict(embeddings)
    for name, mask in misses.items():
        jt = out[name]
        values = jt.values() * (~mask.to(jt.values().device)).unsqueeze(1).to(jt.values().dtype)
        out[name] = JaggedTensor(values=values, lengths=jt.lengths())
    return out


class HstuEmbeddings(nn.Module):
    """KeyedJaggedTensor -> dict[feature name, JaggedTensor] over static and dynamic tables.

    Input: ``features`` KJT with keys among the tables' feature names; values int64 [sum N].
    Output: ``{f: JaggedTensor(values [N[f], D[t(f)]], lengths L[f])}``.

    ``ec`` is the TorchRec ``EmbeddingCollection`` of model_parallel and dynamic tables
    (replaced by its sharded version by :func:`hstu.embeddings.shard_embeddings`),
    ``dp_ec`` a plain ``EmbeddingCollection`` of the data_parallel tables (replicated; see
    sharding.py for why TorchRec does not shard it), ``remappers`` one
    :class:`DynamicIdRemapper` per dynamic table.
    """

    rows_written: Callable[[str, torch.Tensor], None] | None = None
    """Told (table, slots) of the rows re-initialised for admitted ids (online training's row
    deltas, :class:`hstu.embeddings.row_deltas.TouchedRows`)."""

    def __init__(
        self,
        ec: nn.Module,
        dp_ec: nn.Module | None,
        specs: list[TableSpec],
        remappers: dict[str, DynamicIdRemapper],
        seed: int,
    ) -> None:
        super().__init__()
        self.ec = ec
        self.dp_ec = dp_ec
        self.specs = {s.name: s for s in specs}
        self.remappers = nn.ModuleDict(remappers)
        self.seed = seed
        self._feature_to_table = {f: s.name for s in specs for f in s.feature_names}
        self._dp_features = {
            f for s in specs if s.sharding_type == "data_parallel" for f in s.feature_names
        }
        self.merge = MergeLookups()

    # --------------------------------------------------------------------- forward

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        """Lookup of already remapped ids (see :meth:`remap`): the sharded collection and the
        replicated one each take the whole KeyedJaggedTensor and look up their own features.

        Written for TorchRec's train pipelines, which fx-trace this forward: the sharded
        module is called once, straight on the batch's features; the replicated collection and
        the merge are leaf modules (they hold no sharded module).
        """
        sharded = self.ec(features)
        if self.dp_ec is None:
            return sharded
        return self.merge(sharded, self.dp_ec(features))

    def lookup(
        self, features: KeyedJaggedTensor, lookup_only: frozenset[str] = frozenset()
    ) -> dict[str, JaggedTensor]:
        """Raw ids -> embeddings in one call (input stage, lookup, misses zeroed): for tools
        and tests; the model runs the stages apart (``GenerativeRecommender.prepare``)."""
        features, misses = self.remap(features, lookup_only)
        return apply_misses(self(features), misses)

    def remap(
        self, features: KeyedJaggedTensor, lookup_only: frozenset[str] = frozenset()
    ) -> tuple[KeyedJaggedTensor, dict[str, torch.Tensor]]:
        """The input stage of dynamic tables: raw ids -> slots, before the lookup (and, in a
        train pipeline, before the input distribution). Returns the remapped features and,
        per feature, a bool miss mask of ids without a slot (their embeddings are zeroed).

        In training every id of a feature is admitted (a collective: every rank calls it on
        every step), except the features in ``lookup_only`` (retrieval negatives, the
        corpus): those are only looked up, never admitted, so sampled ids cannot evict real
        items. In evaluation nothing is admitted.

        One remapper call per table (all its features), on the host (the remappers' state is
        host memory, see hstu/embeddings/dynamic.py): training batches arrive here before
        their copy to the device; ids already on a device (evaluation's side lookups) are
        read back first, outside any training step.
        """
        if not self.remappers:
            return features, {}
        with allowed_sync(HOST_REMAP):
            return self._remap_on_host(features, lookup_only)

    def _remap_on_host(
        self, features: KeyedJaggedTensor, lookup_only: frozenset[str]
    ) -> tuple[KeyedJaggedTensor, dict[str, torch.Tensor]]:
        keys = features.keys()
        device_values = features.values()
        values = device_values.cpu()
        offsets = features.offset_per_key()
        new_values = values.clone()
        misses: dict[str, torch.Tensor] = {}
        for table, remapper in self.remappers.items():
            spans = [
                (k, offsets[i], offsets[i + 1])
                for i, k in enumerate(keys)
                if self._feature_to_table.get(k) == table
            ]
            admit = [span for span in spans if span[0] not in lookup_only]
            # Every rank calls every remapper in training (it is a collective), even with
            # no ids of that table in its batch.
            ids = torch.cat([values[a:b] for _, a, b in admit]) if admit else values[:0]
            slots, miss = remapper(ids)
            if remapper.pending_fresh is not None:
                self._write_fresh_rows(table, *remapper.pending_fresh)
                remapper.pending_fresh = None
            pos = 0
            for k, a, b in admit:
                new_values[a:b] = slots[pos : pos + b - a]
                if miss is not None:
                    misses[k] = miss[pos : pos + b - a]
                pos += b - a
            for k, a, b in spans:
                if k in lookup_only:
                    found_slots, found = remapper.lookup(values[a:b])
                    new_values[a:b] = found_slots
                    if not bool(found.all()):
                        misses[k] = ~found
        if device_values.device.type != "cpu":
            new_values = new_values.to(device_values.device)
            misses = {k: m.to(device_values.device) for k, m in misses.items()}
        elif device_values.is_pinned():  # keeps the pipeline's host-to-device copy asynchronous
            new_values = new_values.pin_memory()
        remapped = KeyedJaggedTensor(
            keys=keys,
            values=new_values,
            lengths=features.lengths(),
            weights=features.weights_or_none(),
            stride=features.stride(),
            # the host-known sizes, so that TorchRec does not read them back from the device
            length_per_key=features.length_per_key(),
            offset_per_key=offsets,
        )
        return remapped, misses

    @torch.no_grad()
    def _write_fresh_rows(self, table: str, slots: torch.Tensor, ids: torch.Tensor) -> None:
        """Re-initialises the rows of newly admitted ids and zeroes their optimizer state."""
        from hstu.embeddings.rows import write_table_rows

        spec = self.specs[table]
        rows = fresh_rows(ids, spec.embedding_dim, default_bound(spec.num_rows),
                          table_seed(self.seed, table))
        write_table_rows(self.ec, table, slots, rows)
        if self.rows_written is not None:
            self.rows_written(table, slots)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """``.to()`` and the like: tables still on the meta device (built with
        ``materialize=False``) stay there, :func:`hstu.embeddings.shard_embeddings` places
        each rank's shards (the remappers stay on the host in any case)."""
        if recurse and tables_on_meta(self):
            return self
        return super()._apply(fn, recurse)

    # ----------------------------------------------------------------- live rows

    def remapper_of(self, feature: str) -> DynamicIdRemapper | None:
        """The remapper of the dynamic table that looks up ``feature`` (None: no table of
        this collection looks it up, or a static one does)."""
        table = self._feature_to_table.get(feature)
        if table is None or table not in self.remappers:
            return None
        return self.remappers[table]  # (an nn.ModuleDict has no get)

    def draw_live(
        self, feature: str, num: int, min_id: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``num`` uniform draws over the live rows of the dynamic table of ``feature``:
        (slots [num], ids [num], live rows L); see :meth:`DynamicIdRemapper.draw_live` (the
        same on every rank; the seed is the run's, per table)."""
        table = self._feature_to_table[feature]
        seed = table_seed(self.seed, f"{table}/live_negatives")
        with allowed_sync(HOST_REMAP):
            return self.remappers[table].draw_live(num, seed, min_id)

    # ----------------------------------------------------------------------- stats

    def stats(self) -> dict[str, dict[str, int | float]]:
        """Per dynamic table: capacity, occupancy, admitted/evicted counts (for the log)."""
        return {name: r.stats() for name, r in self.remappers.items()}

    def log_stats(self, step: int | None = None) -> str:
        parts = [
            f"{name}: occupancy {s['occupied']}/{s['capacity']} ({s['occupancy']:.1%}), "
            f"admitted {s['admitted_total']} evicted {s['evicted_total']} "
            f"(last step +{s['admitted_last_step']}/-{s['evicted_last_step']}), "
            f"eval misses {s['eval_misses_total']}, shared-row lookups {s['shared_row_lookups']}"
            + (f", not admitted {s['not_admitted_total']}" if self.remappers[name].admission
               is not None else "")
            for name, s in self.stats().items()
        ]
        line = ("[embeddings] " + (f"step {step}: " if step is not None else "") + "; ".join(parts))
        if parts:
            logger.info(line)
        return line


def _dynamic_capacity(
    table: DynamicEmbeddingArgs, dim: int, sparse_optimizer: str, device: torch.device
) -> tuple[int, bool, int]:
    """(table rows, caching on, device cache rows) for a dynamic table."""
    plan = table.resolve_hbm(dim, sparse_optimizer)
    print(f"[embeddings] dynamic {plan.describe(table.table_name)}", flush=True)
    if table.caching:
        if device.type == "cuda":
            # Host (UVM) memory holds the whole vocabulary; HBM caches plan.capacity_rows.
            return table.item_vocab_size_or_capacity, True, plan.capacity_rows
        print(
            f"[embeddings] table {table.table_name}: caching=True is not applicable on "
            f"{device.type} (UVM caching needs a GPU); ignored",
            flush=True,
        )
    return plan.capacity_rows, False, 0


def _remapper(table: DynamicEmbeddingArgs, rows: int) -> DynamicIdRemapper:
    """The remapper of a dynamic table of ``rows`` rows: with admission, the last row is the
    one lookups of ids not admitted read (DynamicIdRemapper.miss_slot), the others hold ids."""
    if table.admit_min_count == 1:
        return DynamicIdRemapper(table.table_name, rows, table.evict_strategy)
    if rows < 2:
        raise ValueError(
            f"dynamic table {table.table_name}: admission (admit_min_count="
            f"{table.admit_min_count}) keeps one row for ids not admitted, and the table has "
            f"{rows}; raise its capacity"
        )
    return DynamicIdRemapper(
        table.table_name, rows - 1, table.evict_strategy, admit_min_count=table.admit_min_count,
        sketch_width=table.admit_sketch_width, sketch_depth=table.admit_sketch_depth,
    )


def build_embedding_collection(
    tables: list[EmbeddingArgs],
    embedding_dims: dict[str, int],
    device: torch.device | str = "cpu",
    seed: int = 0,
    sparse_optimizer: str = "adam",
    materialize: bool = True,
) -> HstuEmbeddings:
    """One module over all tables; deterministic weights for a seed.

    With ``materialize=False`` every table is created on the meta device (no memory).
    Starting values follow one rule, :func:`initial_rows`: row r of table t is
    ``fresh_rows([r], D[t], default_bound(C[t]), table_seed(seed, t))``, a function of the
    row's global id, the seed and the table name alone, so a table starts bitwise the same
    whatever the number of ranks and the sharding.

    Args:
        tables: static (``EmbeddingArgs``) and dynamic (``DynamicEmbeddingArgs``) tables.
        embedding_dims: D per table name (e.g. item tables ``resolved_item_embedding_dim``).
        device: where the remappers' state lives, and the tables when ``materialize``.
        seed: the run's seed (an admitted dynamic id's row: :func:`fresh_rows` of the id and
            :func:`table_seed`, as every starting row).
        sparse_optimizer: ``OptimizerArgs.resolved_sparse_optimizer_str``; sizes the
            per-row optimizer state in the dynamic tables' HBM budget.
        materialize: True: every table allocated whole on ``device`` and written (unsharded
            use: tools, single-process references). False: the tables stay on the meta
            device and :func:`hstu.embeddings.shard_embeddings` allocates and writes only
            the shards each rank holds (the trainer's path).
    """
    device = torch.device(device)
    configs: list[EmbeddingConfig] = []
    specs: list[TableSpec] = []
    remappers: dict[str, DynamicIdRemapper] = {}
    for table in tables:
        name = table.table_name
        if name not in embedding_dims:
            raise KeyError(f"no embedding dim given for table {name!r}")
        dim = embedding_dims[name]
        if isinstance(table, DynamicEmbeddingArgs):
            rows, caching, cache_rows = _dynamic_capacity(table, dim, sparse_optimizer, device)
            remappers[name] = _remapper(table, rows)
            specs.append(
                TableSpec(name, tuple(table.feature_names), rows, dim, True,
                          "model_parallel", caching, cache_rows, table.admission_sketch_bytes)
            )
        else:
            rows = table.item_vocab_size_or_capacity
            specs.append(TableSpec(name, tuple(table.feature_names), rows, dim, False,
                                   table.sharding_type))
        configs.append(
            EmbeddingConfig(
                name=name,
                embedding_dim=dim,
                num_embeddings=rows,
                feature_names=list(table.feature_names),
                # values are written by initialise_tables, after the shards exist
                init_fn=_written_later,
            )
        )
    is_dp = [s.sharding_type == "data_parallel" for s in specs]
    # (TorchRec's sharder copies a collection's values only when it is not on the meta device)
    where = device if materialize else torch.device("meta")
    ec = EmbeddingCollection(tables=[c for c, d in zip(configs, is_dp) if not d], device=where)
    dp_ec = (
        EmbeddingCollection(tables=[c for c, d in zip(configs, is_dp) if d], device=where)
        if any(is_dp) else None
    )
    emb = HstuEmbeddings(ec, dp_ec, specs, remappers, seed)
    if materialize:
        initialise_tables(emb)
    return emb


def _written_later(weight: torch.Tensor) -> None:
    """TorchRec's per-table ``init_fn``: nothing; :func:`initialise_tables` writes the values
    once the rank's shards exist (TorchRec's default would draw them at random first)."""


def allocate_weight(module: nn.Module, device: torch.device) -> None:
    """An embedding module's weight moved off the meta device: allocated, not written."""
    weight = module.weight
    module.weight = nn.Parameter(torch.empty(weight.shape, dtype=weight.dtype, device=device),
                                 requires_grad=weight.requires_grad)


def tables_on_meta(emb: HstuEmbeddings) -> bool:
    """True while a table of ``emb`` has no memory yet (built with ``materialize=False``
    and not yet sharded)."""
    return any(
        p.device.type == "meta"
        for c in (emb.ec, emb.dp_ec) if c is not None
        for p in c.parameters()
    )


def table_seed(seed: int, table: str) -> int:
    """The seed of one table's starting values: a stable 64-bit hash of (seed, table name),
    so two tables of the same shape do not start as copies of each other (Python's hash()
    of a str changes per process; this does not)."""
    digest = hashlib.blake2b(f"{seed}/{table}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


INIT_CHUNK_VALUES = 1 << 20
"""Values (rows x full D) drawn at a time while a table or shard is written."""

INIT_BYTES_PER_VALUE = 48
"""Peak transient bytes per value of a chunk: fresh_rows' int64 and float64 temporaries
and its float32 result (measured: 40-50 B on CPU)."""


def init_chunk_rows(dim: int) -> int:
    """Rows of one chunk of a table of full width ``dim``."""
    return max(1, INIT_CHUNK_VALUES // dim)


def initial_rows(
    first_row: int, num_rows: int, spec: TableSpec, seed: int, cols: tuple[int, int] | None = None
) -> torch.Tensor:
    """Starting values of rows [first_row, first_row + num_rows) of a table: float32
    [num_rows, D] (or the columns ``cols`` = [c0, c1) of them)."""
    ids = torch.arange(first_row, first_row + num_rows, dtype=torch.int64)
    rows = fresh_rows(
        ids, spec.embedding_dim, default_bound(spec.num_rows), table_seed(seed, spec.name)
    )
    return rows if cols is None else rows[:, cols[0]:cols[1]]


@torch.no_grad()
def write_initial_rows(local: torch.Tensor, offsets: list[int], spec: TableSpec, seed: int) -> None:
    """Writes the starting values of the piece of a table at global ``offsets`` (row, col)
    into ``local`` [r, c], :data:`INIT_CHUNK_VALUES` values at a time (no copy of the piece
    is ever made)."""
    r0, c0 = offsets[0], offsets[1]
    step = init_chunk_rows(spec.embedding_dim)
    for start in range(0, local.shape[0], step):
        n = min(step, local.shape[0] - start)
        rows = initial_rows(r0 + start, n, spec, seed, (c0, c0 + local.shape[1]))
        local[start:start + n].copy_(rows)


def initialise_tables(emb: HstuEmbeddings) -> None:
    """Writes every table's starting values into what this rank holds of it: its local
    shards of the sharded collection, or whole tables (replicated or unsharded)."""
    from hstu.embeddings.rows import local_pieces

    for spec in emb.specs.values():
        for local, offsets in local_pieces(emb, spec.name):
            write_initial_rows(local, offsets, spec, emb.seed)
