"""Semantic-id tokenizer (issue 52, build item 1): residual k-means codes plus a collision level,
deterministic for a seed, unique code sequences always, from an item file's text, a vectors file
or a checkpoint's item table; the codes file and its loader; bad input as one line naming the
file and the field. MovieLens-100K's u.item (../shared/data/ml-100k, skipped with a reason when
absent) is tokenized whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hstu.data.errors import DataError
from hstu.data.semantic_ids import collision_index
from hstu.sid import load_codes, save_codes, tokenize
from hstu.sid.tokenize import main, parse_args, run

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT.parent / "shared" / "data" / "ml-100k"
if not REAL.exists():
    REAL = Path("/work/shared/data/ml-100k")


def clustered(n: int = 400, dim: int = 8, centers: int = 12, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    c = g.normal(size=(centers, dim)) * 3
    return (c[g.integers(0, centers, n)] + g.normal(size=(n, dim))).astype(np.float32)


def quiet(*_a, **_k) -> None:
    pass


# --------------------------------------------------------------------------- the codes


def test_the_same_seed_gives_the_same_codes_and_another_seed_other_codes() -> None:
    x, ids = clustered(), np.arange(400) + 1
    a = tokenize(ids, x, levels=3, codes=16, seed=1, log=quiet)
    b = tokenize(ids, x, levels=3, codes=16, seed=1, log=quiet)
    assert np.array_equal(a.codes, b.codes)
    assert all(np.array_equal(p, q) for p, q in zip(a.centroids, b.centroids))
    c = tokenize(ids, x, levels=3, codes=16, seed=2, log=quiet)
    assert not np.array_equal(a.codes, c.codes)  # the seed is used


@pytest.mark.slow  # (the one-process determinism tests stay in the default tier)
def test_the_same_codes_in_two_processes(tmp_path) -> None:
    """Across processes too (nothing depends on hash seeds or the process's state)."""
    x = clustered(200)
    np.save(tmp_path / "v.npy", x)
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "hstu.sid.tokenize", "--vectors", str(tmp_path / "v.npy"),
                        "--levels", "2", "--codes", "8", "--out", str(tmp_path / name)],
                       cwd=ROOT, check=True, capture_output=True, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"})
    assert np.array_equal(load_codes(tmp_path / "a").codes, load_codes(tmp_path / "b").codes)


def test_code_sequences_are_unique_even_when_many_items_have_identical_vectors() -> None:
    g = np.random.default_rng(3)
    x = np.concatenate([np.tile(g.normal(size=(1, 6)), (150, 1)), g.normal(size=(50, 6))])
    ids = np.arange(200) * 7
    lines: list[str] = []
    sid = tokenize(ids, x.astype(np.float32), levels=2, codes=16, seed=1, log=lines.append)
    assert sid.codes.shape == (200, 3)
    assert len(np.unique(sid.codes, axis=0)) == 200
    stats = sid.config["stats"]
    assert stats["largest_group"] >= 150 and stats["last_level_max"] == stats["largest_group"] - 1
    assert sorted(sid.codes[:150, -1]) == list(range(150))  # the identical ones numbered 0..149
    # all items identical: level 1 has 1 distinct vector, so 1 code is fitted (said in a line)
    lines.clear()
    same = tokenize(np.arange(20), np.ones((20, 4), np.float32), levels=2, codes=4, log=lines.append)
    assert len(np.unique(same.codes, axis=0)) == 20 and same.config["level_codes"] == [1, 1]
    assert any("level 1" in ln and "1 distinct" in ln and "1 fitted" in ln for ln in lines), lines


def test_collision_index_orders_by_distance_then_id() -> None:
    prefix = np.array([[0, 1], [0, 1], [2, 2], [0, 1], [0, 1]])
    residual = np.array([[3.0], [1.0], [5.0], [1.0], [0.0]], np.float32)
    ids = np.array(["a", "d", "c", "b", "e"], dtype=object)
    # group (0, 1): "e" (distance 0), then "b" and "d" (distance 1, by id), then "a" (3);
    # by id alone it would be a, b, d, e
    assert collision_index(prefix, residual, ids).tolist() == [3, 2, 0, 1, 0]
    assert collision_index(prefix, residual, np.array([0, 10, 20, 30, 40])).tolist() == [3, 1, 0, 2, 0]


def test_each_level_quantizes_the_residual_of_the_levels_before() -> None:
    x, ids = clustered(500, dim=10), np.arange(500)
    sid = tokenize(ids, x, levels=3, codes=8, seed=1, log=quiet)
    errors = [s["mse"] for s in sid.config["stats"]["levels"]]
    assert errors[0] > errors[1] > errors[2] > 0
    # level l's centroid c is (k-means at convergence) the mean of the residuals x - sum of the
    # earlier levels' centroids over its items: fitted on residuals, not on the vectors
    residual = x.astype(np.float64)
    for level, centers in enumerate(sid.centroids):
        labels = sid.codes[:, level]
        means = np.stack([residual[labels == c].mean(axis=0) for c in range(len(centers))])
        assert np.allclose(means, centers, atol=1e-2), level
        residual = residual - centers[labels]
    recon = sum(c[sid.codes[:, i]] for i, c in enumerate(sid.centroids))
    assert np.isclose(((x - recon) ** 2).sum(axis=1).mean(), errors[-1], rtol=1e-4)


# --------------------------------------------------------------------------- the inputs


ITEMS = [(i, f"title {w} {i % 7}", "|".join(g for g in ("Drama", "Comedy", "Action") if i % (2 + len(g) % 3) == 0))
         for i, w in zip(range(1, 61), ("alpha beta gamma delta epsilon zeta eta theta iota kappa " * 6).split())]


def write_items(path: Path) -> Path:
    if path.suffix == ".csv":
        path.write_text("item_id,title,genres,extra\n" + "".join(f'{i},"{t}",{g},x\n' for i, t, g in ITEMS))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"item_id": i, "title": t, "genres": g}) + "\n" for i, t, g in ITEMS))
    else:
        pq.write_table(pa.table({"item_id": [i for i, _, _ in ITEMS], "title": [t for _, t, _ in ITEMS],
                                 "genres": [g or None for _, _, g in ITEMS]}), path)
    return path


def cli(*args: str) -> object:
    return run(parse_args(list(args)), log=quiet)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_an_item_file_to_codes(tmp_path, suffix) -> None:
    items = write_items(tmp_path / f"items{suffix}")
    cli("--items", str(items), "--text-columns", "title,genres", "--levels", "2", "--codes", "8",
        "--dim", "8", "--out", str(tmp_path / "sid"))
    sid = load_codes(tmp_path / "sid")
    assert sorted(sid.item_ids.tolist()) == list(range(1, 61)) and sid.codes.shape == (60, 3)
    assert len(np.unique(sid.codes, axis=0)) == 60
    cfg = sid.config
    assert (cfg["levels"], cfg["codes"], cfg["seed"], cfg["dim"]) == (2, 8, 1, 8)
    assert cfg["source"]["kind"] == "items" and cfg["source"]["text_columns"] == ["title", "genres"]
    assert [len(c) for c in sid.centroids] == [8, 8]


def test_the_three_item_formats_give_the_same_codes(tmp_path) -> None:
    out = []
    for suffix in (".csv", ".jsonl", ".parquet"):
        items = write_items(tmp_path / f"items{suffix}")
        out.append(cli("--items", str(items), "--levels", "2", "--codes", "8", "--dim", "8",
                       "--out", str(tmp_path / suffix[1:])))
    assert all(np.array_equal(out[0].codes, o.codes) for o in out[1:])


def test_a_vectors_file_npy_with_ids_or_parquet(tmp_path, capsys) -> None:
    x = clustered(120, dim=5)
    ids = [f"sku-{i}" for i in range(120)]
    np.save(tmp_path / "v.npy", x)
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    vec = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 5)
    pq.write_table(pa.table({"item_id": ids, "vector": vec}), tmp_path / "v.parquet")
    assert main(["--vectors", str(tmp_path / "v.npy"), "--ids", str(tmp_path / "ids.txt"),
                 "--levels", "2", "--codes", "10", "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "level 1: 10/10 codes used, perplexity" in printed and "level 2:" in printed
    assert "collisions:" in printed and "largest group" in printed and "last level max" in printed
    assert "quantization error" in printed
    cli("--vectors", str(tmp_path / "v.parquet"), "--levels", "2", "--codes", "10", "--out", str(tmp_path / "b"))
    a, b = load_codes(tmp_path / "a"), load_codes(tmp_path / "b")
    assert a.item_ids.tolist() == ids == b.item_ids.tolist()
    assert np.array_equal(a.codes, b.codes) and a.config["dim"] == 5
    assert b.config["source"] == {"kind": "vectors", "path": str(tmp_path / "v.parquet"), "ids": None}


def test_help_names_the_three_inputs(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(f in out for f in ("--items", "--vectors", "--ckpt", "--levels", "--codes", "--seed", "--out"))


@pytest.mark.skipif(not (REAL / "u.item").exists(), reason=f"real MovieLens-100K not found at {REAL}")
def test_movielens_100k_titles_and_genres_to_codes(tmp_path, capsys) -> None:
    assert main(["--items", str(REAL / "u.item"), "--text-columns", "title,genres", "--levels", "3",
                 "--codes", "256", "--seed", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    sid = load_codes(tmp_path)
    assert len(sid.item_ids) == 1682 and sid.item_ids.dtype == np.int64 and sid.codes.shape == (1682, 4)
    assert len(np.unique(sid.codes, axis=0)) == 1682
    levels = sid.config["stats"]["levels"]
    assert levels[0]["codes_used"] == 256 and levels[0]["variance_left"] < 0.5
    assert levels[2]["mse"] < levels[1]["mse"] < levels[0]["mse"]
    assert "1682 items" in printed and "level 3: 256/256 codes used" in printed


# --------------------------------------------------------------------------- bad input


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_item_files_are_one_line_naming_the_file_and_field(tmp_path, capsys) -> None:
    items = write_items(tmp_path / "items.csv")
    err = one_line_error(capsys, ["--items", str(items), "--text-columns", "title,genre", "--codes", "4",
                                  "--out", str(tmp_path / "o")])
    assert str(items) in err and "field genre:" in err and "missing column" in err and "genres" in err
    err = one_line_error(capsys, ["--items", str(items), "--codes", "61", "--out", str(tmp_path / "o")])
    assert str(items) in err and "--codes" in err and "only 60 items" in err
    dup = tmp_path / "dup.csv"
    dup.write_text("item_id,title,genres\n1,a,x\n2,b,y\n1,c,z\n")
    err = one_line_error(capsys, ["--items", str(dup), "--codes", "2", "--out", str(tmp_path / "o")])
    assert f"{dup}:4: field item_id:" in err and "duplicate item id 1" in err
    empty_id = tmp_path / "e.jsonl"
    empty_id.write_text('{"item_id": "a", "title": "x", "genres": ""}\n{"item_id": "", "title": "y", "genres": ""}\n')
    err = one_line_error(capsys, ["--items", str(empty_id), "--codes", "1", "--out", str(tmp_path / "o")])
    assert f"{empty_id}:2: field item_id: empty item id" in err
    assert not (tmp_path / "o").exists()


def test_bad_vectors_are_one_line(tmp_path, capsys) -> None:
    x = clustered(10, dim=3)
    x[4, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    err = one_line_error(capsys, ["--vectors", str(tmp_path / "nan.npy"), "--codes", "2", "--out", str(tmp_path / "o")])
    assert str(tmp_path / "nan.npy") in err and "row 5" in err and "NaN" in err
    pq.write_table(pa.table({"item_id": [1, 2], "emb": [[0.0], [1.0]]}), tmp_path / "v.parquet")
    err = one_line_error(capsys, ["--vectors", str(tmp_path / "v.parquet"), "--codes", "2", "--out", str(tmp_path / "o")])
    assert "field vector: missing column" in err and "emb" in err
    pq.write_table(pa.table({"item_id": [1, 1], "vector": [[0.0], [1.0]]}), tmp_path / "d.parquet")
    err = one_line_error(capsys, ["--vectors", str(tmp_path / "d.parquet"), "--codes", "2", "--out", str(tmp_path / "o")])
    assert "field item_id: duplicate item id 1 (rows 1 and 2)" in err


def _good_codes(tmp_path: Path) -> Path:
    sid = tokenize(np.arange(30), clustered(30, dim=4), levels=2, codes=4, log=quiet)
    return save_codes(sid, tmp_path / "good")


def _rewrite(path: Path, out: Path, table: pa.Table | None = None, config: dict | None = None, meta: bool = True) -> Path:
    t = pq.read_table(path) if table is None else table
    cfg = json.loads(pq.read_table(path).schema.metadata[b"hstu.sid"])
    if config is not None:
        cfg = config
    t = t.replace_schema_metadata({b"hstu.sid": json.dumps(cfg).encode()} if meta else None)
    pq.write_table(t, out)
    return out


def test_the_loader_refuses_a_bad_codes_file_in_one_line_naming_the_field(tmp_path) -> None:
    good = _good_codes(tmp_path)
    assert load_codes(good).codes.shape == (30, 3)
    table = pq.read_table(good)
    cfg = json.loads(table.schema.metadata[b"hstu.sid"])
    codes = np.asarray(table.column("codes").combine_chunks().flatten()).reshape(30, 3)

    def bad(name: str, **kw) -> str:
        with pytest.raises(DataError) as exc:
            load_codes(_rewrite(good, tmp_path / f"{name}.parquet", **kw))
        msg = str(exc.value)
        assert "\n" not in msg and str(tmp_path / f"{name}.parquet") in msg
        return msg

    assert "field hstu.sid: no config" in bad("nometa", meta=False)
    assert "field hstu.sid.levels: missing" in bad("nolevels", config={k: v for k, v in cfg.items() if k != "levels"})
    assert "field hstu.sid.codes: expected a positive integer" in bad("k0", config={**cfg, "codes": 0})
    short = pa.table({"item_id": table.column("item_id"), "codes": pa.array(codes[:, :2].tolist())})
    assert "field codes: row 1 has 2 codes" in bad("short", table=short)
    big = codes.copy()
    big[3, 1] = 4
    assert "field codes: row 4: code 4 at level 2 is outside [0, 4)" in bad(
        "big", table=pa.table({"item_id": table.column("item_id"), "codes": pa.array(big.tolist())}))
    same = codes.copy()
    same[1] = same[0]
    assert "field codes: 1 code sequences are shared" in bad(
        "same", table=pa.table({"item_id": table.column("item_id"), "codes": pa.array(same.tolist())}))
    ids = np.arange(30)
    ids[5] = 0
    assert "field item_id: item id 0 appears 2 times" in bad(
        "dupid", table=pa.table({"item_id": ids, "codes": table.column("codes")}))
    noid = pa.table({"id": table.column("item_id"), "codes": table.column("codes")})
    assert "field item_id: missing column" in bad("noid", table=noid)
    with pytest.raises(DataError, match="no such codes file"):
        load_codes(tmp_path / "nowhere")


def test_l2_normalize_codes_directions_not_lengths(tmp_path, capsys) -> None:
    """Items along 3 directions at lengths 1 and 20: scaled to unit length, each direction is
    one first-level code; as they are, k-means splits the long vectors from the short ones."""
    rng = np.random.default_rng(0)
    directions = np.eye(3, dtype=np.float32)
    x = np.concatenate([directions[i % 3] * (1.0 if i < 30 else 20.0)
                        + 0.01 * rng.standard_normal(3) for i in range(60)]).reshape(60, 3)
    np.save(tmp_path / "v.npy", x.astype(np.float32))
    args = ["--vectors", str(tmp_path / "v.npy"), "--levels", "1", "--codes", "3"]
    assert main([*args, "--l2-normalize", "--out", str(tmp_path / "n")]) == 0
    assert "scaled to unit length" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "raw")]) == 0
    first = load_codes(tmp_path / "n").codes[:, 0]
    raw = load_codes(tmp_path / "raw").codes[:, 0]
    direction = np.arange(60) % 3
    # normalised: code = a function of the direction alone, three codes
    assert all(len(set(first[direction == d])) == 1 for d in range(3))
    assert len(set(first.tolist())) == 3
    assert load_codes(tmp_path / "n").config["source"]["l2_normalized"] is True
    # raw: the short vectors of all directions sit near the origin and share a code
    assert len(set(raw[:30].tolist())) == 1
    x[7] = 0.0
    np.save(tmp_path / "z.npy", x)
    err = one_line_error(capsys, ["--vectors", str(tmp_path / "z.npy"), "--codes", "3", "--l2-normalize",
                                  "--out", str(tmp_path / "o")])
    assert "1 item vectors are all zeros" in err and "--l2-normalize" in err
    with pytest.raises(SystemExit):  # refused, not ignored: item-file vectors are unit length
        parse_args(["--items", "u.item", "--l2-normalize", "--out", str(tmp_path / "o")])
    assert "--l2-normalize is for --vectors or --ckpt" in capsys.readouterr().err
