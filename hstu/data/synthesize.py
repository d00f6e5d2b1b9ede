"""Random raw folders in the official layouts, at the official sizes times a fraction.

    python -m hstu.data.synthesize --dataset kuairand-27k --fraction 0.25 --out /data/kr27k-raw
    python -m hstu.data.preprocess --dataset kuairand-27k --raw /data/kr27k-raw --out tmp_data

For measuring cost, never quality: docs/data.md, "Random raw files in the official layouts",
says what is faithful (file names, headers, column order, value formats and quoting, sizes,
every item at least once) and what is random. Log files are written in blocks of about
BLOCK_ROWS rows (bounded memory), with numpy and pyarrow (no per-row Python).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from hstu.console import format_bytes
from hstu.data.sources import KUAIRAND_ACTION_BITS

BLOCK_ROWS = 1 << 20
_MS_PER_DAY = 86_400_000


@dataclasses.dataclass(frozen=True)
class Official:
    """A dataset's published size and raw layout. Legend: U users, I items, N interactions."""

    users: int
    items: int
    interactions: int
    min_length: int
    log_files: tuple[str, ...]
    """KuaiRand: one per period, in time order; KuaiRand-27K's two part files of a period
    split its users (the first half, the rest)."""
    suffix: str = ""


def _kuairand_logs(suffix: str, parts: bool) -> tuple[str, ...]:
    ends = ("_part1", "_part2") if parts else ("",)
    periods = ("4_08_to_4_21", "4_22_to_5_08")
    return tuple(f"log_standard_{p}_{suffix}{end}.csv" for p in periods for end in ends)


OFFICIAL: dict[str, Official] = {
    # KuaiRand (standard logs, 2022-04-08 .. 2022-05-08): kuairand.com
    "kuairand-pure": Official(27_077, 7_583, 1_436_609, 2, _kuairand_logs("pure", False), "pure"),
    "kuairand-1k": Official(1_000, 4_369_953, 11_713_045, 2, _kuairand_logs("1k", False), "1k"),
    "kuairand-27k": Official(
        27_285, 32_038_725, 322_278_385, 2, _kuairand_logs("27k", True), "27k"
    ),
    # MovieLens (grouplens.org): every user has at least 20 ratings
    "ml-20m": Official(138_493, 26_744, 20_000_263, 20, ("ratings.csv",)),
    "ml-1m": Official(6_040, 3_706, 1_000_209, 20, ("ratings.dat",)),
}
_ML_MAX_MOVIE = {"ml-20m": 131_262, "ml-1m": 3_952}  # movie ids are sparse up to this
_ML_TIME = {"ml-20m": (789_652_009, 1_427_784_002), "ml-1m": (956_703_932, 1_046_454_590)}
_KUAIRAND_START_MS = 1_649_347_200_000  # 2022-04-08 00:00 +08:00
_KUAIRAND_PERIOD_DAYS = (14, 17)
KUAIRAND_LOG_COLUMNS = (
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
    "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
    "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab",
)  # fmt: skip
# flag -> rate of 1s (fixed, click-through-like; not KuaiRand's measured rates)
FLAG_RATES = {
    "is_click": 0.3, "is_like": 0.02, "is_follow": 0.002, "is_comment": 0.003,
    "is_forward": 0.001, "is_hate": 0.001, "long_view": 0.2, "is_profile_enter": 0.01,
}  # fmt: skip
assert set(FLAG_RATES) == {name for name, _ in KUAIRAND_ACTION_BITS}
# the user-feature file: numbers and the range label the official file gives them
_KUAIRAND_RANGES = {
    "follow_user_num": (
        (0, 1, 10, 50, 100, 150, 250, 500),
        ("0", "(0,10)", "[10,50)", "[50,100)", "[100,150)", "[150,250)", "[250,500)", "500+"),
    ),
    "fans_user_num": (
        (0, 1, 10, 100, 1_000, 5_000, 10_000, 100_000),
        ("0", "[1,10)", "[10,100)", "[100,1k)", "[1k,5k)", "[5k,1w)", "[1w,10w)", "[10w,100w)"),
    ),
    "friend_user_num": ((0, 1, 5, 30, 60, 120, 250),
                        ("0", "[1,5)", "[5,30)", "[30,60)", "[60,120)", "[120,250)", "250+")),
    "register_days": ((15, 31, 61, 91, 181, 366, 731),
                      ("15-30", "31-60", "61-90", "91-180", "181-365", "366-730", "730+")),
}  # fmt: skip
_ACTIVE_DEGREES = np.array(["high_active", "full_active", "middle_active", "UNKNOWN"])
_ML_RATINGS_20M = np.array(["0.5", "1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0", "4.5", "5.0"])
_ML_RATING_WEIGHTS_20M = np.array([1, 3, 1.5, 7, 4.5, 21, 11, 27, 8, 15])
_ML_RATING_WEIGHTS_1M = np.array([6, 11, 26, 35, 22])
_ML_AGES = np.array([1, 18, 25, 35, 45, 50, 56])


def _lengths(users: int, total: int, min_length: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [users] >= min_length summing to total (log-normal shares of the rest)."""
    rest = total - users * min_length
    share = rng.lognormal(0.0, 1.0, size=users)
    extra = np.floor(share / share.sum() * rest).astype(np.int64)
    extra[: rest - int(extra.sum())] += 1
    return min_length + extra


class _Items:
    """Row r of N -> an item index in [0, I): exactly I rows spread evenly are "cover" rows
    giving each item once; the rest Zipf-like ranks. Then a fixed bijection scatters the
    indices so popular items are not the small ids."""

    def __init__(self, items: int, rows: int, seed: int) -> None:
        self.items, self.rows = items, rows
        mult = 0x9E3779B97F4A7C15 % items if items > 1 else 1
        while np.gcd(mult, items) != 1:
            mult += 1
        self.mult, self.add = mult, (seed * 7919) % items

    def __call__(self, start: int, count: int, rng: np.random.Generator) -> np.ndarray:
        r = np.arange(start, start + count, dtype=np.int64)
        # floor((r + 1) * I / N) > floor(r * I / N) on exactly I rows of [0, N)
        hi = (r + 1) * self.items // self.rows
        cover = hi > r * self.items // self.rows
        index = np.minimum(rng.pareto(0.8, size=count).astype(np.int64), self.items - 1)
        index[cover] = hi[cover] - 1
        return (index * self.mult + self.add) % self.items  # < 2**50: no int64 overflow


def _user_blocks(lengths: np.ndarray) -> Iterator[tuple[int, int]]:
    """Ranges [a, b) of users with about BLOCK_ROWS interactions each."""
    ends = np.cumsum(lengths)
    a = 0
    while a < len(lengths):
        base = ends[a - 1] if a else 0
        b = int(np.searchsorted(ends, base + BLOCK_ROWS, side="right"))
        b = max(b, a + 1)
        yield a, b
        a = b


def _csv_bytes(columns: dict[str, np.ndarray], sep: str = ",") -> bytes:
    """Rows of plain values (no quoting needed) as delimited text, no header."""
    buf = io.BytesIO()
    one = "\x1f" if len(sep) > 1 else sep
    pacsv.write_csv(
        pa.table(columns),
        buf,
        pacsv.WriteOptions(include_header=False, delimiter=one, quoting_style="none"),
    )
    data = buf.getvalue()
    return data.replace(b"\x1f", sep.encode()) if one != sep else data


def _quote(values: np.ndarray) -> np.ndarray:
    """CSV quoting as the official files have it: a field with a comma is quoted."""
    values = values.astype(str)
    has_comma = np.char.find(values, ",") >= 0
    return np.where(has_comma, np.char.add(np.char.add('"', values), '"'), values)


def _kuairand_users(users: int, rng: np.random.Generator) -> bytes:
    cols: dict[str, np.ndarray] = {
        "user_id": np.arange(users),
        "user_active_degree": _ACTIVE_DEGREES[rng.integers(0, 4, users)],
        "is_lowactive_period": (rng.random(users) < 0.05).astype(np.int64),
        "is_live_streamer": (rng.random(users) < 0.02).astype(np.int64),
        "is_video_author": (rng.random(users) < 0.1).astype(np.int64),
    }
    for name, (bounds, labels) in _KUAIRAND_RANGES.items():
        number = np.floor(rng.lognormal(np.log(max(bounds[1], 2) * 3), 1.5, users)).astype(np.int64)
        if name == "register_days":
            number = np.maximum(number, 15)
        label = np.asarray(labels)[np.searchsorted(np.asarray(bounds), number, side="right") - 1]
        cols[name] = number
        cols[f"{name}_range"] = _quote(label)
    for k in range(18):
        cols[f"onehot_feat{k}"] = rng.integers(0, 8 if k < 2 else 50, users)
    lines = map(",".join, zip(*(values.astype(str).tolist() for values in cols.values())))
    return (",".join(cols) + "\n" + "\n".join(lines) + "\n").encode()


def _kuairand_log_block(
    users: np.ndarray, lengths: np.ndarray, period: int, item: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    n = int(lengths.sum())
    user = np.repeat(users, lengths)
    within = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    days = _KUAIRAND_PERIOD_DAYS[period]
    start = _KUAIRAND_START_MS + sum(_KUAIRAND_PERIOD_DAYS[:period]) * _MS_PER_DAY
    span = days * _MS_PER_DAY
    step = span / np.repeat(lengths, lengths)
    time_ms = start + ((within + rng.random(n)) * step).astype(np.int64)
    local = (time_ms + 8 * 3_600_000).astype("datetime64[ms]")  # Beijing time
    day = local.astype("datetime64[D]")
    month = day.astype("datetime64[M]")
    date = (
        (month.astype("datetime64[Y]").astype(np.int64) + 1970) * 10_000
        + (month.astype(np.int64) % 12 + 1) * 100
        + (day - month).astype(np.int64)
        + 1
    )
    hourmin = ((local - day).astype(np.int64) // 3_600_000) * 100
    duration = rng.integers(3_000, 300_000, n)
    flags = {name: (rng.random(n) < rate).astype(np.int8) for name, rate in FLAG_RATES.items()}
    zeros = np.zeros(n, dtype=np.int8)
    cols: dict[str, np.ndarray] = {
        "user_id": user,
        "video_id": item,
        "date": date,
        "hourmin": hourmin,
        "time_ms": time_ms,
        **flags,
        "play_time_ms": (duration * rng.random(n)).astype(np.int64),
        "duration_ms": duration,
        "profile_stay_time": zeros,
        "comment_stay_time": zeros,
        "is_rand": zeros,
        "tab": rng.integers(0, 15, n, dtype=np.int8),
    }
    return {name: cols[name] for name in KUAIRAND_LOG_COLUMNS}  # the official column order


def _ml_log_block(
    dataset: str, users: np.ndarray, lengths: np.ndarray, item: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    n = int(lengths.sum())
    user = np.repeat(users, lengths)
    lo, hi = _ML_TIME[dataset]
    first = rng.integers(lo, hi - 86_400, size=len(users))
    within = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    stamp = np.minimum(np.repeat(first, lengths) + within * rng.integers(1, 120, n), hi)
    movie = 1 + item * _ML_MAX_MOVIE[dataset] // OFFICIAL[dataset].items
    if dataset == "ml-20m":
        p = _ML_RATING_WEIGHTS_20M / _ML_RATING_WEIGHTS_20M.sum()
        rating = _ML_RATINGS_20M[rng.choice(10, size=n, p=p)]
        return {"userId": user, "movieId": movie, "rating": rating, "timestamp": stamp}
    p = _ML_RATING_WEIGHTS_1M / _ML_RATING_WEIGHTS_1M.sum()
    return {"u": user, "m": movie, "r": rng.choice(5, size=n, p=p) + 1, "t": stamp}


def _ml_1m_users(users: int, rng: np.random.Generator) -> bytes:
    cols = {
        "u": np.arange(1, users + 1),
        "g": np.where(rng.random(users) < 0.72, "M", "F"),
        "a": _ML_AGES[rng.integers(0, len(_ML_AGES), users)],
        "o": rng.integers(0, 21, users),
        "z": np.char.zfill(rng.integers(0, 100_000, users).astype(str), 5),
    }
    return _csv_bytes(cols, "::")


def synthesize(
    dataset: str, fraction: float, out: Path, seed: int = 0, min_length: int | None = None
) -> dict[str, int]:
    """Writes `dataset`'s raw files at its official size times `fraction` into `out`;
    returns the sizes written (users, items, interactions, bytes). `min_length`: the
    shortest history (default: the dataset's minimum, 2 for KuaiRand, 20 for MovieLens)."""
    if dataset not in OFFICIAL:
        raise ValueError(f"--dataset {dataset!r}: one of {', '.join(OFFICIAL)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction {fraction}: a number in (0, 1]")
    if min_length is not None and min_length < 1:
        raise ValueError(f"--min-length {min_length}: at least 1")
    spec = OFFICIAL[dataset]
    least = spec.min_length if min_length is None else min_length
    # the official sizes times `fraction`: users and items at least 1, each user at least
    # `least` interactions, every item at least once
    num_users = max(1, round(spec.users * fraction))
    num_items = max(1, round(spec.items * fraction))
    num_rows = max(round(spec.interactions * fraction), num_users * least, num_items)
    rng = np.random.default_rng(seed)
    lengths = _lengths(num_users, num_rows, least, rng)
    items = _Items(num_items, num_rows, seed)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    if dataset.startswith("kuairand"):  # user ids from 0
        first = np.floor(lengths * (14 / 31)).astype(np.int64)  # the first period: 14 of 31 days
        periods = (first, lengths - first)
        files_per_period = len(spec.log_files) // 2
        half = (num_users + 1) // 2
        for k, name in enumerate(spec.log_files):
            users = np.arange(num_users)
            if files_per_period == 2:  # part1: the first half of the users, part2 the rest
                users = users[:half] if k % 2 == 0 else users[half:]
            period = k // files_per_period
            written += _write_log(
                out / name, dataset, users, periods[period][users], period, items, rng,
                ",".join(KUAIRAND_LOG_COLUMNS), written,
            )  # fmt: skip
        (out / f"user_features_{spec.suffix}.csv").write_bytes(_kuairand_users(num_users, rng))
    else:  # MovieLens: user ids from 1
        header = "userId,movieId,rating,timestamp" if dataset == "ml-20m" else None
        written = _write_log(
            out / spec.log_files[0], dataset, np.arange(1, num_users + 1), lengths, 0, items,
            rng, header, 0,
        )  # fmt: skip
        if dataset == "ml-1m":
            (out / "users.dat").write_bytes(_ml_1m_users(num_users, rng))
    assert written == num_rows
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {
        "users": num_users,
        "items": num_items,
        "interactions": num_rows,
        "bytes": total,
    }


def _write_log(
    path: Path,
    dataset: str,
    users: np.ndarray,
    lengths: np.ndarray,
    period: int,
    items: _Items,
    rng: np.random.Generator,
    header: str | None,
    row0: int,
) -> int:
    """Writes one log file block by block (the rows of ``users`` [U'] with their ``lengths``
    [U'], items from row ``row0`` of the dataset on); returns its number of rows."""
    rows = 0
    with open(path, "wb") as fh:
        if header is not None:
            fh.write(header.encode() + b"\n")
        for a, b in _user_blocks(lengths):
            n = int(lengths[a:b].sum())
            item = items(row0 + rows, n, rng)
            if dataset.startswith("kuairand"):
                cols = _kuairand_log_block(users[a:b], lengths[a:b], period, item, rng)
                fh.write(_csv_bytes(cols))
            else:
                cols = _ml_log_block(dataset, users[a:b], lengths[a:b], item, rng)
                fh.write(_csv_bytes(cols, "," if dataset == "ml-20m" else "::"))
            rows += n
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hstu.data.synthesize",
        description="Random raw files in a dataset's official layout and size times --fraction "
        "(cost only, never quality).",
    )
    parser.add_argument("--dataset", required=True, help=f"one of {', '.join(OFFICIAL)}")
    parser.add_argument("--fraction", type=float, default=1.0, help="of the official size (0, 1]")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the raw files to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-length",
        type=int,
        default=None,
        help="shortest history (default: 2 for KuaiRand, 20 for MovieLens, as published)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        got = synthesize(args.dataset, args.fraction, args.out, args.seed, args.min_length)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    print(
        f"wrote {args.out}: {args.dataset} x {args.fraction:g}: {got['users']} users, "
        f"{got['items']} items, {got['interactions']} interactions, "
        f"{format_bytes(got['bytes'])} in {seconds:.1f}s (random: cost only, never quality)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
