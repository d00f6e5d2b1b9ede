"""Reading an exported artifact with torch alone (docs/serving.md describes the files).

Legend: B users of a batch, L item slots (history then candidates, padded), D widths, I items
in the corpus (ids [0, num_items)), k top-k.

    art = load_artifact("artifacts/ml-100k")
    ids, scores = art.recommend(histories, timestamps, k=10)          # retrieval
    ids, scores = art.recommend(histories, timestamps, k=10, request_times=now)  # rab_query_time
    logits = art.score(histories, timestamps, candidates, cand_ts)     # ranking

Nothing here imports torchrec, megatron or gin: tables are plain tensors with the ids the
model knows items by, the dense model is a ``torch.export`` program (or its AOTInductor
package), and what is left (id lookup, padding, full-corpus top-k) is a few torch ops.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor

from hstu.serving import versions
from hstu.serving.model import history_pairs

FORMAT = "hstu-artifact"
# 4: the model config names max_attn_len, min_full_attn_seq_len, attn_truncation_layers and
# attn_truncation_len; a version-3 artifact (without them) reads as all four 0, as it was trained
FORMAT_VERSION = 4
READABLE_VERSIONS = (3, 4)
MANIFEST = "manifest.json"
TABLES_FILE = "tables.pt"
WEIGHTS_FILE = "dense_weights.pt"
DENSE_PROGRAM = "dense.pt2"
AOTI_PACKAGE = "dense_aoti.pt2"
CACHE_PROGRAMS = {
    "encode_history": "encode_history.pt2", "score_candidates": "score_candidates.pt2"
}
EMBEDDING_DUMP = "item_embeddings.parquet"
ITEM_MAP = "item_map.parquet"
USER_MAP = "user_map.parquet"
EXIT_BAD_INPUT = 2
EXIT_DAMAGED = 3  # as the trainer's checkpoint faults (docs/failures.md)


class ArtifactError(Exception):
    """An artifact that cannot be used (printed as one line). ``code``: the exit code, 2 for
    a wrong path or version, 3 for a damaged or unwritable file."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.code = code


# what torch's zip reader says about a truncated or damaged archive (torch.load, torch.export)
_TORCH_ZIP_ERRORS = ("PytorchStreamReader failed", "failed finding central directory")


def _load_tensors(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def load_file(path: Path, loader: Any) -> Any:
    """``loader(path)``; a truncated or damaged file -> ArtifactError naming it (exit 3)."""
    try:
        return loader(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; re-export the checkpoint", EXIT_DAMAGED) from None
    except (zipfile.BadZipFile, EOFError) as exc:
        raise ArtifactError(f"{path}: truncated or damaged ({type(exc).__name__}: {exc}); "
                            "re-export the checkpoint", EXIT_DAMAGED) from None
    except RuntimeError as exc:
        text = " ".join(str(exc).split())
        if not any(m in text for m in _TORCH_ZIP_ERRORS):
            raise
        raise ArtifactError(f"{path}: truncated or damaged ({text[:160]}); re-export the "
                            "checkpoint", EXIT_DAMAGED) from None


class Tables:
    """feature -> (sorted ids int64 [R], vectors float32 [R, D]); ids -> rows by binary search."""

    def __init__(self, tables: dict[str, dict[str, Tensor]]) -> None:
        self.tables = tables

    def dim(self, feature: str) -> int:
        return int(self.tables[feature]["vectors"].shape[1])

    def find(self, feature: str, ids: Tensor) -> tuple[Tensor, Tensor]:
        """ids int64 [N] -> (rows [N] (0 where missing), found bool [N])."""
        known = self.tables[feature]["ids"]
        if known.numel() == 0:
            return torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
        pos = torch.searchsorted(known, ids.contiguous()).clamp(max=known.numel() - 1)
        found = known[pos] == ids
        return torch.where(found, pos, 0), found

    def lookup(self, feature: str, ids: Tensor) -> Tensor:
        """ids [N] -> [N, D]; unknown ids get a zero vector (as the trainer's misses)."""
        rows, found = self.find(feature, ids)
        vectors = self.tables[feature]["vectors"][rows]
        return vectors * found.unsqueeze(1).to(vectors.dtype)


def pad_inputs(
    tables: Tables,
    cfg: dict[str, Any],
    items: list[Tensor],
    timestamps: list[Tensor] | None,
    num_candidates: Tensor,
    actions: list[Tensor] | None = None,
    contextual: Tensor | None = None,
    request_times: Tensor | None = None,
) -> tuple:
    """Per-user id lists (history then candidates) -> the dense program's padded inputs
    (items, item_lengths, num_candidates, timestamps, actions, contextual, and for a model
    with ``rab_query_time`` the request times); ``contextual`` int64 [B, X] ids,
    ``request_times`` int64 [B] (unix seconds). At least 2 slots (the exported programs'
    smallest L)."""
    lengths = torch.tensor([t.numel() for t in items], dtype=torch.int64)
    bsz, slots = len(items), max(2, int(lengths.max()) if len(items) else 2)
    flat = torch.cat(items) if items else torch.zeros(0, dtype=torch.int64)
    pos = torch.arange(slots).unsqueeze(0) < lengths.unsqueeze(1)  # [B, L]
    item_name = cfg["item_feature_name"]
    padded = torch.zeros(bsz, slots, tables.dim(item_name))
    padded[pos] = tables.lookup(item_name, flat)
    ts = None
    if timestamps is not None and cfg["relative_attention_bias"] and cfg["rab_use_time"]:
        ts = torch.zeros(bsz, slots, dtype=torch.int64)
        ts[pos] = torch.cat(timestamps).to(torch.int64)
    acts = None
    if cfg["has_action"]:
        name = cfg["action_feature_name"]
        acts = torch.zeros(bsz, slots, tables.dim(name))
        if actions is None:
            raise ArtifactError("this model reads the history's actions; the input has none")
        alen = torch.tensor([a.numel() for a in actions], dtype=torch.int64)
        apos = torch.arange(slots).unsqueeze(0) < alen.unsqueeze(1)
        acts[apos] = tables.lookup(name, torch.cat(actions).to(torch.int64))
    ctx = None
    names = cfg["contextual_feature_names"]
    if names:
        if contextual is None:
            raise ArtifactError(f"this model reads contextual features {names}; the input has none")
        ctx = torch.stack(
            [tables.lookup(n, contextual[:, k].to(torch.int64)) for k, n in enumerate(names)], 1
        )
    out = (padded, lengths, num_candidates.to(torch.int64), ts, acts, ctx)
    if cfg.get("rab_query_time", False):
        if request_times is None or ts is None:
            raise ArtifactError("this model reads the request time and the history's timestamps "
                                "(rab_query_time); the input lacks them")
        return (*out, request_times.to(torch.int64).reshape(bsz))
    return out


def candidate_logits(out: Tensor, item_lengths: Tensor, num_candidates: Tensor) -> Tensor:
    """Ranking program output [B, L, W] -> the candidates' rows [sum(C), W] in sample order."""
    slots = out.shape[1]
    p = torch.arange(slots).unsqueeze(0)
    hist = (item_lengths - num_candidates).unsqueeze(1)
    return out[(p >= hist) & (p < item_lengths.unsqueeze(1))]


class Corpus:
    """The retrieval corpus: normalised vectors of ids [0, num_items) (zeros for ids the item
    table does not hold, as the trainer's lookups), scored in one matmul per chunk."""

    def __init__(self, item_table: dict[str, Tensor], cfg: dict[str, Any]) -> None:
        self.num_items = int(cfg["num_items"])
        self.min_item_id = int(cfg["min_item_id"])
        t = Tables({"item": item_table})
        # a dynamic item table ("corpus": "table"): the ids its rows hold, ascending; else the
        # ids [0, num_items) (column i is id i)
        self.ids: Tensor | None = None
        if cfg.get("corpus") == "table":
            held = item_table["ids"]
            self.ids = held[held >= self.min_item_id]
        ids = self.ids if self.ids is not None else torch.arange(self.num_items, dtype=torch.int64)
        self.vectors = F.normalize(
            t.lookup("item", ids).float(), p=2.0, dim=-1, eps=float(cfg["l2_norm_eps"])
        )

    def top_k(self, queries: Tensor, histories: list[Tensor], k: int) -> tuple[Tensor, Tensor]:
        """queries [B, D] -> (ids [B, k], scores [B, k]): history items and ids below
        min_item_id excluded (-inf), as in the trainer's evaluation."""
        scores = queries @ self.vectors.t()  # [B, I]
        if self.min_item_id > 0 and self.ids is None:
            scores[:, : self.min_item_id] = float("-inf")
        width = scores.shape[1]
        if histories:
            rows, hist = history_pairs(histories)
            if self.ids is None:
                inside = (hist >= 0) & (hist < self.num_items)
                cols = hist
            else:  # history ids -> their columns (those the table holds)
                cols = torch.searchsorted(self.ids, hist).clamp(max=max(width - 1, 0))
                inside = (self.ids[cols] == hist) if width else torch.zeros_like(hist, dtype=bool)
            scores[rows[inside], cols[inside]] = float("-inf")
        top_scores, top = scores.topk(min(k, width), dim=1)
        return (top if self.ids is None else self.ids[top]), top_scores


def history_cacheable(cfg: dict[str, Any]) -> bool:
    """Whether the cached-history pair can serve this model: ranking, history states that
    never see the candidates (not so for mask_convention "peer" without the causal mask), and
    no attention truncation (its cut depends on the number of candidates)."""
    return (
        cfg["task"] == "ranking"
        and (cfg["mask_convention"] != "peer" or cfg["is_causal"])
        and not cfg.get("attn_truncation_layers", 0)
    )


def example_inputs(cfg: dict[str, Any], batch_size: int = 3, slots: int = 5) -> dict[str, tuple]:
    """Exported method of InferenceHSTU -> (example arguments, the symbolic dims of each
    argument: "B" users, "L" item slots, "W" history tokens, "K" new candidates; None: static)."""
    torch.manual_seed(0)
    dims = cfg["feature_dims"]
    b, n = batch_size, slots
    uses_time = cfg["relative_attention_bias"] and cfg["rab_use_time"]
    lengths = torch.tensor([n, n - 1, 2][:b] + [n] * max(0, b - 3), dtype=torch.int64)
    if cfg["task"] == "ranking":
        cands = torch.tensor([2, 1, 1][:b] + [1] * max(0, b - 3), dtype=torch.int64)
    else:
        cands = torch.zeros(b, dtype=torch.int64)
    items = torch.randn(b, n, dims[cfg["item_feature_name"]])
    ts = torch.cumsum(torch.randint(1, 1000, (b, n)), 1) if uses_time else None
    acts = torch.randn(b, n, dims[cfg["action_feature_name"]]) if cfg["has_action"] else None
    names = cfg["contextual_feature_names"]
    ctx = torch.randn(b, len(names), dims[names[0]]) if names else None

    def shape(t: Tensor | None, labels: tuple) -> tuple | None:
        return None if t is None else labels

    out = {
        "forward": (
            [items, lengths, cands, ts, acts, ctx],
            [("B", "L", None), ("B",), ("B",), shape(ts, ("B", "L")), shape(acts, ("B", "L", None)),
             shape(ctx, ("B", None, None))],
        )
    }
    if cfg.get("rab_query_time", False):  # the request time: a while after the last event
        out["forward"][0].append(ts[:, -1] + 1000)
        out["forward"][1].append(("B",))
    if history_cacheable(cfg):
        nxt = ts[:, -1] + 10 if ts is not None else None
        out["encode_history"] = (
            [items, lengths, ts, acts, ctx, nxt],
            [("B", "L", None), ("B",), shape(ts, ("B", "L")), shape(acts, ("B", "L", None)),
             shape(ctx, ("B", None, None)), shape(nxt, ("B",))],
        )
        width = len(names) + (2 if cfg["has_action"] else 1) * n  # history token slots
        layers, heads, hd = cfg["num_layers"], cfg["num_heads"], cfg["head_dim"]
        k = 3
        out["score_candidates"] = (
            [
                torch.randn(layers, b, width, heads, hd),
                torch.randn(layers, b, width, heads, hd),
                torch.cumsum(torch.randint(1, 1000, (b, width)), 1),
                torch.full((b,), width - 1, dtype=torch.int64),
                torch.randn(b, k, dims[cfg["item_feature_name"]]),
                torch.tensor([3, 2, 1][:b] + [3] * max(0, b - 3)),
                torch.cumsum(torch.randint(1, 1000, (b, k)), 1) + 10**6 if uses_time else None,
            ],
            [
                (None, "B", "W", None, None), (None, "B", "W", None, None), ("B", "W"), ("B",),
                ("B", "K", None), ("B",), ("B", "K") if uses_time else None,
            ],
        )
    return out


class Artifact:
    """An exported model: manifest, tables, dense program (and the cached-history pair).

    ``path``: an artifact folder, or a versioned serving root (:mod:`hstu.serving.versions`):
    then the version its ``LATEST`` names, held (a lease: never pruned) until :meth:`close`."""

    def __init__(self, path: str | Path, use_aoti: bool = True) -> None:
        self.root: Path | None = None
        """The versioned root read through its pointer (None: a plain artifact folder)."""
        self.version: str | None = None
        """The version served from :attr:`root` ("v120"; None: a plain artifact folder)."""
        self._lease: versions.Lease | None = None
        path = Path(path)
        if versions.is_versioned_root(path):
            try:
                folder, self._lease = versions.open_latest(path)
            except versions.VersionError as exc:
                raise ArtifactError(str(exc), exc.code) from None
            self.root, self.version, path = path, folder.name, folder
        self.path = path
        try:
            self._open(use_aoti)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Releases the version's lease (a plain artifact folder holds none)."""
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, use_aoti: bool) -> None:
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise ArtifactError(
                f"{self.path}: not an hstu artifact (no {MANIFEST}); write one with "
                "python -m hstu.export"
            )
        try:
            self.manifest = json.loads(manifest.read_text())
        except ValueError as exc:
            raise ArtifactError(f"{manifest}: unreadable ({exc})") from None
        fmt, version = self.manifest.get("format"), self.manifest.get("format_version")
        if fmt != FORMAT or version not in READABLE_VERSIONS:
            raise ArtifactError(
                f"{self.path}: artifact format {fmt!r} version {version}, this hstu reads "
                f"{FORMAT!r} versions {', '.join(map(str, READABLE_VERSIONS))}; re-export the "
                "checkpoint with python -m hstu.export"
            )
        from hstu.training.checkpoint import check_files  # torch only: the checkpoints' check

        problem = check_files(str(self.path))  # sizes and CRC32 against the manifest
        if problem is not None:
            raise ArtifactError(f"{problem}; re-export the checkpoint", EXIT_DAMAGED)
        self.cfg: dict[str, Any] = self.manifest["model"]
        self.task: str = self.manifest["task"]
        self.tables = Tables(load_file(self.path / TABLES_FILE, _load_tensors))
        self.program = None
        self.runtime = "torch.export"
        self.fallback: str | None = None
        """Why the AOTInductor package was not used although present (None: it was, or absent)."""
        aoti = self.manifest.get("aoti") or {}
        if use_aoti and aoti.get("package") and (self.path / aoti["package"]).is_file():
            try:
                from torch._inductor import aoti_load_package

                self.program = aoti_load_package(str(self.path / aoti["package"]))
                self.runtime = "aoti"
            # a package compiled for another torch, compiler or CPU fails in many ways; the
            # portable program computes the same model: named, then used
            except Exception as exc:  # noqa: BLE001
                self.program = None
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                self.fallback = (
                    f"{self.path / aoti['package']}: the AOTInductor package did not load "
                    f"({type(exc).__name__}: {first}); running the portable torch.export "
                    "program (same model; re-export on this host for the compiled one)"
                )
                print(f"[hstu] note: {self.fallback}", file=sys.stderr, flush=True)
        if self.program is None:
            self.program = load_file(self.path / DENSE_PROGRAM, torch.export.load).module()
        self._cache_programs: dict[str, Any] = {}
        self._corpus: Corpus | None = None
        self._decoder: Any = None

    # ---------------------------------------------------------------------- pieces

    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = Corpus(self.tables.tables[self.cfg["item_feature_name"]], self.cfg)
        return self._corpus

    def cache_program(self, name: str):
        if name not in self._cache_programs:
            path = self.path / CACHE_PROGRAMS[name]
            if not path.is_file():
                raise ArtifactError(
                    f"{self.path}: no {path.name} (cached-history scoring is for ranking models "
                    'whose history never sees the candidates: not mask_convention="peer" with '
                    "is_causal=False, and without attention truncation)"
                )
            self._cache_programs[name] = load_file(path, torch.export.load).module()
        return self._cache_programs[name]

    def eager_model(self):
        """The dense model as a plain nn.Module (hstu.serving.model, torch only; a semantic-id
        model's with its code decoder, hstu.serving.sid)."""
        if self.cfg.get("sid"):
            from hstu.serving.sid import InferenceSid as model_cls
        else:
            from hstu.serving.model import InferenceHSTU as model_cls

        model = model_cls(self.cfg)
        model.load_state_dict(load_file(self.path / WEIGHTS_FILE, _load_tensors))
        return model.eval()

    @property
    def decoder(self):
        """A semantic-id model's code decoder and catalogue (:class:`hstu.serving.sid.
        InferenceSid`, loaded once); None for a model that scores an item table."""
        if not self.cfg.get("sid"):
            return None
        if self._decoder is None:
            self._decoder = self.eager_model()
        return self._decoder

    @property
    def uses_request_time(self) -> bool:
        """Whether the model reads the request time (trained with ``rab_query_time``)."""
        return bool(self.cfg.get("rab_query_time", False))

    @torch.no_grad()
    def run(self, inputs: tuple) -> Tensor:
        return self.program(*inputs)

    # ---------------------------------------------------------------------- tasks

    @torch.no_grad()
    def recommend(self, items: list[Tensor], timestamps: list[Tensor] | None, k: int,
                  actions: list[Tensor] | None = None, contextual: Tensor | None = None,
                  request_times: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Retrieval: per-user histories (model item ids) -> top-k (ids [B, k], scores [B, k]).
        ``request_times`` int64 [B] (unix seconds): when each query is asked, which a model
        trained with ``rab_query_time`` needs (:attr:`uses_request_time`). A semantic-id model
        decodes its top-k by beam search (scores: the sum of the codes' log-probabilities; id
        -1 where the catalogue has fewer than k items beside the history)."""
        no_candidates = torch.zeros(len(items), dtype=torch.int64)
        inputs = pad_inputs(
            self.tables, self.cfg, items, timestamps, no_candidates, actions, contextual,
            request_times,
        )
        if self.decoder is not None:
            return self.decoder.top_k(self.run(inputs), items, k)
        return self.corpus.top_k(self.run(inputs), items, k)

    @torch.no_grad()
    def score(self, items: list[Tensor], timestamps: list[Tensor] | None, num_candidates: Tensor,
              actions: list[Tensor] | None = None, contextual: Tensor | None = None) -> Tensor:
        """Ranking: per-user items (history then candidates) -> logits [sum(C), W]."""
        keep = 0
        if self.cfg.get("attn_truncation_layers", 0):
            keep = int(self.cfg.get("attn_truncation_len", 0))
        if keep and num_candidates.numel() and int(num_candidates.max()) > keep:
            raise ArtifactError(
                f"{int(num_candidates.max())} candidates in one request, but the model's attention "
                f"truncation keeps the last {keep} tokens of a sample (attn_truncation_len); "
                f"score at most {keep} candidates per request"
            )
        inputs = pad_inputs(
            self.tables, self.cfg, items, timestamps, num_candidates, actions, contextual
        )
        return candidate_logits(self.run(inputs), inputs[1], inputs[2])


def load_artifact(path: str | Path, use_aoti: bool = True) -> Artifact:
    """An artifact folder, or the newest complete version of a versioned serving root."""
    return Artifact(path, use_aoti)


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "Artifact",
    "ArtifactError",
    "Corpus",
    "Tables",
    "candidate_logits",
    "example_inputs",
    "history_cacheable",
    "load_artifact",
    "load_file",
    "pad_inputs",
]
