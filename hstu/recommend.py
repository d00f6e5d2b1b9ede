r"""Recommendations from an exported artifact, with torch alone (docs/serving.md).

    python -m hstu.recommend --model ART --input tmp_data/ml-100k --out top10.parquet --top-k 10
    python -m hstu.recommend --model ART --input events.csv --out top10.csv --top-k 10
    python -m hstu.recommend --model RANKING_ART --input events.csv --candidates cands.csv \
        --out scores.csv

Retrieval: the top-K items of the full corpus for every user of the input (their history
excluded). Ranking: the head's scores for given candidates per user (``--candidates``), or for
each user's last N events (``--holdout-last N``). Inputs, outputs and the request time:
docs/serving.md, "recommend".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import torch

from hstu.columns import USER_FEATURE, accepted, pick_column
from hstu.serving.artifact import EXIT_BAD_INPUT, ITEM_MAP, USER_MAP, Artifact, ArtifactError


class InputError(Exception):
    """A histories file that cannot be used (printed as one line)."""


@dataclass
class Events:
    """Every user's events in time order (stable): users [U] (raw user ids), offsets [U+1],
    items [N] model item ids, timestamps [N], actions [N] or None, contextual name -> [U]."""

    users: list
    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    actions: np.ndarray | None
    contextual: dict[str, np.ndarray]
    skipped_events: int = 0
    unknown: dict[str, int] | None = None
    """contextual feature -> users whose value the model's table does not hold."""


def _read_table(path: Path) -> pa.Table:
    try:
        if path.suffix.lower() == ".csv":
            return pcsv.read_csv(path)
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        msg = " ".join(str(exc).split())
        if "Empty CSV file" in msg or path.stat().st_size == 0:
            raise InputError(f"{path}: empty file, no events to recommend from") from None
        raise InputError(f"{path}: unreadable ({msg})") from None


def _column(table: pa.Table, names: tuple[str, ...], path: Path):
    for name in names:
        if name in table.column_names:
            return table.column(name)
    raise InputError(
        f"{path}: no column {' / '.join(names)} (columns: {', '.join(table.column_names)})"
    )


def _event_column(table: pa.Table, role: str, path: Path, required: bool = True):
    """The column holding ``role`` (user, item, timestamp) by training's names (hstu.columns)."""
    name = pick_column(role, table.column_names)
    if name is None and required:
        have = ", ".join(table.column_names)
        raise InputError(f"{path}: no column {accepted(role)} (columns: {have})")
    return table.column(name) if name is not None else None


def _timestamps(table: pa.Table, path: Path) -> np.ndarray:
    """int64 [rows]: the timestamp column, or zeros where the file has none."""
    col = _event_column(table, "timestamp", path, required=False)
    if col is None:
        return np.zeros(table.num_rows, dtype=np.int64)
    return col.to_numpy(zero_copy_only=False).astype(np.int64)


def _model_user_ids(art: Artifact, raw: list) -> np.ndarray:
    """Raw user ids -> the model's user id feature through the artifact's user map (-1 for a
    user the model does not know)."""
    path = art.path / USER_MAP
    if not path.is_file():
        raise ArtifactError(f"{path}: missing, and the model reads {USER_FEATURE!r}; "
                            "re-export the checkpoint (an artifact of this version writes it)")
    m = pq.read_table(path)
    ids, raws = m.column(USER_FEATURE).to_pylist(), m.column("raw_user_id").to_pylist()
    from_raw = {str(r): i for i, r in zip(ids, raws)}
    return np.asarray([from_raw.get(str(r), -1) for r in raw], dtype=np.int64)


class ItemIds:
    """Raw item ids <-> model item ids (the dataset's item map, or the identity without one)."""

    def __init__(self, art: Artifact) -> None:
        self.to_raw: dict[int, Any] | None = None
        self.from_raw: dict[Any, int] | None = None
        self.hashed = None
        stream = art.manifest.get("stream") or {}
        if stream.get("ids") == "hashed":  # an online model keyed by hash: any raw id's key
            from hstu.data.stream.core import HashedIds

            self.hashed = HashedIds("item")
            self.hashed.kind = stream.get("item_id_kind")
        path = art.path / ITEM_MAP
        if path.is_file():
            m = pq.read_table(path)
            ids, raw = m.column("item_id").to_pylist(), m.column("raw_item_id").to_pylist()
            self.to_raw = dict(zip(ids, raw))
            self.from_raw = {r: i for i, r in zip(ids, raw)}
            self.from_raw.update({str(r): i for i, r in zip(ids, raw)})

    def model_ids(self, raw: list) -> np.ndarray:
        if self.hashed is not None:  # the key a raw id has (-1: not an id of the stream's kind)
            if self.hashed.kind == "int":
                keys = [int(r) + 1 if isinstance(r, (int, np.integer)) or str(r).isdigit()
                        else -1 for r in raw]
                return np.asarray(keys, dtype=np.int64)
            return self.hashed.keys(np.asarray([str(r) for r in raw]))
        if self.from_raw is None:
            return np.asarray([int(r) if r is not None else -1 for r in raw], dtype=np.int64)
        get = self.from_raw.get
        return np.asarray([get(r, get(str(r), -1)) for r in raw], dtype=np.int64)

    def raw_ids(self, ids: np.ndarray) -> list:
        if self.to_raw is None:
            return ids.tolist()
        return [self.to_raw.get(int(i)) for i in ids]


def read_events(path: Path, art: Artifact, item_ids: ItemIds) -> Events:
    """A preprocessed dataset folder or a raw events file -> Events (unknown items dropped)."""
    cfg = art.cfg
    action_name = cfg.get("action_feature_name") if cfg["has_action"] else None
    ctx_names = list(cfg["contextual_feature_names"])
    if path.is_dir():
        meta_path = path / "metadata.json"
        if not meta_path.is_file():
            raise InputError(f"{path}: a folder but not a preprocessed dataset (no metadata.json)")
        table = pq.read_table(path / "sequences.parquet")
        if table.num_rows == 0:
            raise InputError(f"{path}: no users, no events to recommend from")
        meta = json.loads(meta_path.read_text())
        if meta.get("dataset") != art.manifest["dataset"]["name"]:
            print(
                f"[recommend] note: {path} is dataset {meta.get('dataset')!r}, the model was "
                f"trained on {art.manifest['dataset']['name']!r}", file=sys.stderr,
            )
        col = table.column("item_ids").combine_chunks()
        offsets = col.offsets.to_numpy().astype(np.int64)
        offsets = offsets - offsets[0]
        items = col.flatten().to_numpy().astype(np.int64)
        ts = table.column("timestamps").combine_chunks().flatten().to_numpy().astype(np.int64)
        actions = None
        if action_name is not None:
            actions = table.column("actions").combine_chunks().flatten().to_numpy().astype(np.int64)
        user_column = "raw_user_id" if "raw_user_id" in table.column_names else "user_id"
        users = table.column(user_column).to_pylist()
        contextual = {}
        for name in ctx_names:
            if name not in table.column_names:
                raise InputError(
                    f"{path}: the model reads contextual feature {name!r}, which this dataset lacks"
                )
            contextual[name] = table.column(name).to_numpy().astype(np.int64)
    else:
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if path.stat().st_size == 0:
            raise InputError(f"{path}: empty file, no events to recommend from")
        table = _read_table(path)
        if table.num_rows == 0:
            raise InputError(f"{path}: no events (only a header)")
        raw_users = _event_column(table, "user", path).to_pylist()
        items = item_ids.model_ids(_event_column(table, "item", path).to_pylist())
        ts = _timestamps(table, path)
        actions = None
        if action_name is not None:
            acol = _column(table, (action_name, "action"), path)
            actions = acol.to_numpy(zero_copy_only=False).astype(np.int64)
        _, first, inverse = np.unique(
            np.asarray([str(u) for u in raw_users]), return_index=True, return_inverse=True
        )
        users = [raw_users[i] for i in first]  # each user's first row's raw id
        order = np.lexsort((ts, inverse))  # by user, then time; stable within ties
        counts = np.bincount(inverse, minlength=len(first))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        items, ts = items[order], ts[order]
        if actions is not None:
            actions = actions[order]
        contextual = {}
        for name in ctx_names:
            if name == USER_FEATURE:  # the user column's raw ids, mapped as the preprocessor did
                contextual[name] = _model_user_ids(art, users)
                continue
            c = _column(table, (name,), path).to_numpy(zero_copy_only=False).astype(np.int64)
            contextual[name] = c[first]  # each user's first row's value
    # unknown users and contextual values: ids the model's tables do not hold (zero embedding)
    unknown = {}
    for name, values in contextual.items():
        _, found = art.tables.find(name, torch.from_numpy(values))
        if int((~found).sum()):
            unknown[name] = int((~found).sum())
    # unknown items: ids the model's item table does not hold (skipped and counted)
    _, found = art.tables.find(cfg["item_feature_name"], torch.from_numpy(items))
    known = found.numpy()
    if item_ids.hashed is not None:
        # a stream's keys: an item without a row now (evicted, expired) stays in the history
        # as the trainer reads it, a miss with a zero vector
        known = items > 0
    elif cfg["task"] == "retrieval":
        known &= (items >= cfg["min_item_id"]) & (items < cfg["num_items"])
    skipped = int((~known).sum())
    if skipped:
        seg = np.repeat(np.arange(len(users)), np.diff(offsets))
        keep_counts = np.bincount(seg[known], minlength=len(users))
        offsets = np.concatenate([[0], np.cumsum(keep_counts)]).astype(np.int64)
        items, ts = items[known], ts[known]
        if actions is not None:
            actions = actions[known]
    return Events(users, offsets, items, ts, actions, contextual, skipped_events=skipped,
                  unknown=unknown)


def _write(rows: dict[str, list | np.ndarray], out: Path) -> None:
    table = pa.table({k: pa.array(v) for k, v in rows.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        pcsv.write_csv(table, out)
    else:
        pq.write_table(table, out)


def _chunks(samples: list, batch_size: int, desc: str):
    """``samples`` in batches of ``batch_size``, with a progress bar on stderr (with tqdm)."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional at serving time
        tqdm = None
    bar = tqdm(total=len(samples), desc=desc, unit="user", file=sys.stderr, disable=None,
               mininterval=1.0) if tqdm is not None else None
    for b0 in range(0, len(samples), batch_size):
        chunk = samples[b0 : b0 + batch_size]
        yield chunk
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()


def _samples(art: Artifact, events: Events, holdout: int):
    """Per user with a history: (index, history start, history end, end) with the last
    ``holdout`` events held out (retrieval: the target; ranking: the candidates, at most L-1
    of them) and the history cut to the model's longest."""
    max_len = int(art.manifest["dataset"]["max_sequence_length"] or art.cfg["max_item_seqlen"])
    out = []
    for u, (s, e) in enumerate(zip(events.offsets[:-1], events.offsets[1:])):
        held = min(holdout, e - s - 1) if holdout else 0
        if holdout and held < 1:
            continue
        hist_end = e - held
        hist_start = max(s, hist_end - max_len)
        if hist_end > hist_start:
            out.append((u, hist_start, hist_end, e))
    return out


def _contextual(events: Events, names: list[str], chunk: list[tuple]) -> torch.Tensor | None:
    """The contextual ids [B, X] of the users of ``chunk`` (None: the model reads none)."""
    if not names:
        return None
    users = [u for u, *_ in chunk]
    return torch.stack([torch.from_numpy(events.contextual[n][users]) for n in names], 1)


def request_times(
    art: Artifact, events: Events, holdout: int, request_time: int | None
) -> np.ndarray | None:
    """Per event row, the request time of a query whose history ends before that row (None: the
    model reads none): ``request_time``, else the held-out target's timestamp (``holdout``),
    else the newest timestamp of the input."""
    if not art.uses_request_time:
        if request_time is not None:
            raise InputError(
                "--request-time is for models trained with NetworkArgs.rab_query_time; "
                "this one reads no request time"
            )
        return None
    if request_time is not None:
        return np.full(len(events.timestamps) + 1, request_time, dtype=np.int64)
    if holdout:
        return np.append(events.timestamps, 0).astype(np.int64)  # row e: the target's
    newest = int(events.timestamps.max()) if len(events.timestamps) else 0
    print(
        f"[recommend] request time: the newest timestamp of the input, {newest} "
        "(set --request-time)", file=sys.stderr,
    )
    return np.full(len(events.timestamps) + 1, newest, dtype=np.int64)


def recommend(art: Artifact, events: Events, out: Path, top_k: int, batch_size: int, holdout: int,
              request_time: int | None = None) -> dict[str, Any]:
    cfg = art.cfg
    when = request_times(art, events, holdout, request_time)
    samples = _samples(art, events, holdout)
    item_ids = ItemIds(art)
    cols: dict[str, list] = {"user_id": [], "rank": [], "item_id": [], "score": []}
    if holdout:
        cols["target"] = []
    hits = 0
    start = time.perf_counter()
    for chunk in _chunks(samples, batch_size, "recommend"):
        hist = [torch.from_numpy(events.items[s:e]) for _, s, e, _ in chunk]
        ts = [torch.from_numpy(events.timestamps[s:e]) for _, s, e, _ in chunk]
        acts = None
        if events.actions is not None:
            acts = [torch.from_numpy(events.actions[s:e]) for _, s, e, _ in chunk]
        ctx = _contextual(events, cfg["contextual_feature_names"], chunk)
        asked = None if when is None else torch.from_numpy(when[[e for _, _, e, _ in chunk]])
        ids, scores = art.recommend(hist, ts, top_k, acts, ctx, asked)
        k = ids.shape[1]
        for i, (u, _, e, _) in enumerate(chunk):
            cols["user_id"] += [events.users[u]] * k
            cols["rank"] += list(range(1, k + 1))
            if holdout:
                target = int(events.items[e])
                cols["target"] += [item_ids.raw_ids(np.asarray([target]))[0]] * k
                hits += int(target in ids[i, :10].tolist())
        cols["item_id"] += item_ids.raw_ids(ids.reshape(-1).numpy())
        cols["score"] += scores.reshape(-1).tolist()
    elapsed = time.perf_counter() - start
    _write(cols, out)
    report = {
        "users": len(samples), "seconds": elapsed, "users_per_s": len(samples) / max(elapsed, 1e-9),
        "skipped_users": len(events.users) - len(samples),
    }
    if holdout and samples:
        report["HR@10"] = hits / len(samples)
    return report


def _candidates_from_file(path: Path, item_ids: ItemIds, art: Artifact):
    """user -> (candidate model ids, timestamps) from a CSV/parquet (unknown items skipped)."""
    table = _read_table(path)
    users = [str(u) for u in _event_column(table, "user", path).to_pylist()]
    items = item_ids.model_ids(_event_column(table, "item", path).to_pylist())
    ts = _timestamps(table, path)
    _, found = art.tables.find(art.cfg["item_feature_name"], torch.from_numpy(items))
    by_user: dict[str, tuple[list, list]] = {}
    for u, i, t, f in zip(users, items.tolist(), ts.tolist(), found.tolist()):
        if f:
            by_user.setdefault(u, ([], []))[0].append(i)
            by_user[u][1].append(t)
    return by_user, int((~found).sum())


def rank(art: Artifact, events: Events, out: Path, batch_size: int, holdout: int,
         candidates: Path | None) -> dict[str, Any]:
    cfg = art.cfg
    item_ids = ItemIds(art)
    per_user = None
    skipped_cands = 0
    if candidates is not None:
        per_user, skipped_cands = _candidates_from_file(candidates, item_ids, art)
        samples = [s for s in _samples(art, events, 0) if str(events.users[s[0]]) in per_user]
    else:
        samples = _samples(art, events, holdout)
    width = cfg["head_arch"][-1]
    bce = width == cfg["num_tasks"]
    cols: dict[str, list] = {"user_id": [], "item_id": []}
    if holdout and candidates is None and events.actions is not None:
        cols["label"] = []
    logit_cols = [[] for _ in range(width)]
    start = time.perf_counter()
    for chunk in _chunks(samples, batch_size, "rank"):
        seqs, stamps, acts, num_c = [], [], [], []
        for u, s, e, end in chunk:
            if per_user is not None:
                c_ids, c_ts = per_user[str(events.users[u])]
                items = np.concatenate([events.items[s:e], np.asarray(c_ids, np.int64)])
                times = np.concatenate([events.timestamps[s:e], np.asarray(c_ts, np.int64)])
                seqs.append(torch.from_numpy(items))
                stamps.append(torch.from_numpy(times))
                num_c.append(len(c_ids))
            else:
                seqs.append(torch.from_numpy(events.items[s:end]))
                stamps.append(torch.from_numpy(events.timestamps[s:end]))
                num_c.append(end - e)
            if events.actions is not None:
                acts.append(torch.from_numpy(events.actions[s:e]))
        ctx = _contextual(events, cfg["contextual_feature_names"], chunk)
        logits = art.score(seqs, stamps, torch.tensor(num_c, dtype=torch.int64), acts or None, ctx)
        flat_items = torch.cat([sq[len(sq) - c:] for sq, c in zip(seqs, num_c)]).numpy()
        for (u, s, e, end), c in zip(chunk, num_c):
            cols["user_id"] += [events.users[u]] * c
            if "label" in cols:
                cols["label"] += events.actions[e:end].tolist()
        cols["item_id"] += item_ids.raw_ids(flat_items)
        for j in range(width):
            logit_cols[j] += logits[:, j].tolist()
    elapsed = time.perf_counter() - start
    for j in range(width):
        cols[f"logit_{j}"] = logit_cols[j]
    all_logits = torch.tensor(logit_cols, dtype=torch.float32).t()  # [rows, width]
    probs = torch.sigmoid(all_logits) if bce else torch.softmax(all_logits, 1)
    name = "p_task" if bce else "p_class"
    for j in range(width):
        cols[f"{name}{j}"] = probs[:, j].tolist()
    _write(cols, out)
    return {
        "users": len(samples), "seconds": elapsed, "users_per_s": len(samples) / max(elapsed, 1e-9),
        "skipped_candidates": skipped_cands, "skipped_users": len(events.users) - len(samples),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hstu.recommend",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True,
                        help="artifact folder written by python -m hstu.export, or a versioned "
                             "serving root (export --versioned: its newest complete version, "
                             "through LATEST)")
    parser.add_argument("--input", required=True,
                        help="preprocessed dataset folder, or a CSV/parquet of events")
    parser.add_argument("--out", required=True, help="output file (.parquet, or .csv)")
    parser.add_argument("--top-k", type=int, default=10, help="items per user (retrieval)")
    parser.add_argument("--candidates", default=None,
                        help="ranking: CSV/parquet of user, item[, timestamp] to score")
    parser.add_argument("--holdout-last", type=int, default=0, metavar="N",
                        help="hold each user's last N events out of the history (retrieval: N=1, "
                             "the target; ranking: the candidates)")
    parser.add_argument("--request-time", type=int, default=None, metavar="T",
                        help="retrieval models trained with NetworkArgs.rab_query_time: when the "
                             "queries are asked (unix seconds; default: the held-out target's "
                             "timestamp with --holdout-last 1, else the newest timestamp of the "
                             "input)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-aoti", action="store_true",
                        help="run the torch.export program even if an AOTInductor package exists")
    ns = parser.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    art = None
    try:
        art = Artifact(ns.model, use_aoti=not ns.no_aoti)
        if art.version is not None:
            print(
                f"[recommend] model: {art.version} of the versioned root {art.root}",
                file=sys.stderr,
            )
        if art.task == "retrieval" and ns.holdout_last not in (0, 1):
            raise InputError(
                "--holdout-last is 0 or 1 for retrieval (the held-out item is the target)"
            )
        if art.task == "ranking" and ns.request_time is not None:
            raise InputError(
                "--request-time is for retrieval models; ranking candidates carry their own "
                "timestamps"
            )
        if art.task == "retrieval" and ns.candidates:
            raise InputError(
                "--candidates is for ranking models; this artifact is a retrieval model"
            )
        if art.task == "ranking" and not ns.candidates and not ns.holdout_last:
            raise InputError(
                "a ranking model scores candidates: give --candidates FILE or --holdout-last N"
            )
        events = read_events(Path(ns.input), art, ItemIds(art))
        if events.skipped_events:
            print(
                f"[recommend] skipped {events.skipped_events} events whose item ids the model "
                "does not know", file=sys.stderr,
            )
        if events.unknown:
            counts = ", ".join(f"{name} of {n} user{'s' if n > 1 else ''}"
                               for name, n in events.unknown.items())
            print(f"[recommend] values the model does not know, scored with a zero embedding: "
                  f"{counts}", file=sys.stderr)
        if art.task == "retrieval":
            report = recommend(art, events, Path(ns.out), ns.top_k, ns.batch_size, ns.holdout_last,
                               ns.request_time)
        else:
            report = rank(art, events, Path(ns.out), ns.batch_size, ns.holdout_last,
                          Path(ns.candidates) if ns.candidates else None)
            if report["skipped_candidates"]:
                print(
                    f"[recommend] skipped {report['skipped_candidates']} candidates whose item ids "
                    "the model does not know", file=sys.stderr,
                )
    except ArtifactError as exc:  # 2: not an artifact or another version; 3: a damaged file
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if art is not None:
            art.close()  # a version of a versioned root: its lease (held while reading it) ends
    if report["skipped_users"] and report["users"]:
        print(f"[recommend] skipped {report['skipped_users']} users without a usable history "
              "(no known item before the held-out events)", file=sys.stderr)
    if report["users"] == 0:
        print("error: no user has a history the model knows: nothing written", file=sys.stderr)
        return 2
    line = (
        f"[recommend] {report['users']} users in {report['seconds']:.2f}s "
        f"({report['users_per_s']:.0f} users/s, {art.runtime}, {torch.get_num_threads()} "
        f"threads); wrote {ns.out}"
    )
    if "HR@10" in report:
        line += f"; HR@10 of the held-out items {report['HR@10']:.4f}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
