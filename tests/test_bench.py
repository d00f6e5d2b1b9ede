"""hstu.bench: the preset list and the table (the measured runs are in docs/performance.md)."""

from hstu import bench


def test_presets_exist_and_list(capsys) -> None:
    import os

    for p in bench.PRESETS:
        assert os.path.exists(os.path.join(bench.ROOT, p.config)), p.config
    bench.main(["--list"])
    out = capsys.readouterr().out
    assert all(p.name in out for p in bench.PRESETS)


def test_table_has_every_column_and_skips() -> None:
    row = {
        "preset": "x", "processes": 1, "threads_per_process": 2, "tokens_per_s": 1000.0,
        "samples_per_s": 10.0, "step_ms": 5.0, "tflops": 0.001, "mfu": 0.05,
        "peak_rss_gib_per_rank": [1.0],
        "split_ms": {"data": 1, "embedding": 1, "forward": 1, "backward": 1, "optimizer": 1,
                     "communication": 0},
    }
    text = bench._table({"float32": 1e11}, [row, {"preset": "y", "skipped": "no data"}])
    assert "1,000" in text and "5.0%" in text and "no data" in text
    assert "syncs" in text.splitlines()[3]
    audited = dict(row, preset="z", unnamed_syncs_per_step=1.5, named_syncs_per_step=4.0,
                   first_unnamed_sync="aten.nonzero.default at hstu/x.py:3")
    text = bench._table({"float32": 1e11}, [row, audited])
    z = next(line for line in text.splitlines() if line.startswith("z "))
    assert "1.5/4" in z
    assert "z: unnamed host sync aten.nonzero.default at hstu/x.py:3" in text


def test_groups_expand_and_every_scaling_preset_is_listed(capsys) -> None:
    assert set(bench.GROUPS["scaling"]) >= {"seqlen_200", "seqlen_4000", "catalogue_100k_full"}
    assert not set(bench.GROUPS["core"]) & set(bench.GROUPS["scaling"])
    full = bench.BY_NAME["catalogue_10k_full"]
    assert 'RetrievalArgs.negative_sampling="full_corpus"' in full.params
    padded = bench.BY_NAME["zipf_padded"]
    assert 'NetworkArgs.sequence_layout="padded"' in padded.params
    assert [p for p in padded.params if "sequence_layout" not in p] == bench.BY_NAME["zipf_jagged"].params


def test_wide_catalogue_keeps_sequences_and_spreads_items(tmp_path) -> None:
    raw = tmp_path / "ml-100k"
    raw.mkdir()
    (raw / "u.data").write_text("1\t5\t3\t100\n2\t5\t4\t101\n7\t1682\t5\t102\n")
    out = tmp_path / "wide.csv"
    bench._make_wide_catalogue(str(raw), str(out), 6)
    rows = out.read_text().splitlines()
    assert rows[0] == "user,item,rating,timestamp"
    # user u's items move to copy u mod 6; rating and time unchanged
    assert rows[1:] == ["1,1687,3,100", "2,3369,4,101", "7,3364,5,102"]
    (raw / "u.data").write_text("1\t5\t3\n")
    import pytest

    with pytest.raises(ValueError, match=r"u\.data:1: expected 4"):
        bench._make_wide_catalogue(str(raw), str(out), 6)


def test_long_presets_cover_every_method_and_length() -> None:
    names = set(bench.GROUPS["long"])
    assert names == {f"long_{m}_{t}" for m in ("full", "window256", "window1024", "sl1.5", "sl1.7", "trunc")
                     for t in ("1k", "4k", "16k", "64k")}
    assert not names & set(bench.GROUPS["core"])
    assert bench.BY_NAME["long_window1024_16k"].long == ("window1024", 16384)
    assert "NetworkArgs.max_attn_len=1024" in bench.BY_NAME["long_window1024_16k"].params
    assert "NetworkArgs.attn_truncation_layers=1" in bench.BY_NAME["long_trunc_64k"].params
    assert bench.BY_NAME["long_full_4k"].params == []


def test_long_presets_skip_what_cannot_run(monkeypatch) -> None:
    """No subprocess is started for a preset over the time limit (by the FLOP estimate), nor
    for stochastic length without its sampler; each says why in one line."""
    import argparse

    a = argparse.Namespace(steps=2, warmup=1, long_timeout=60.0, threads=1, gin_param=[],
                           memory_limit_gib=8.0)
    started = []
    monkeypatch.setattr(bench.subprocess, "run", lambda *x, **k: started.append(x))
    r = bench._run_long(bench.BY_NAME["long_full_64k"], a, roof_flops=1e11)
    assert "needs ~" in r["skipped"] and "--long-timeout 60" in r["skipped"]
    # the window's estimate grows linearly: 64k at W = 256 is far cheaper than full attention
    assert bench.long_step_flops("window256", 65536) * 100 < bench.long_step_flops("full", 65536)
    assert bench.long_step_flops("trunc", 16384) < bench.long_step_flops("full", 16384) / 3
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    r = bench._run_long(bench.BY_NAME["long_sl1.5_4k"], a, roof_flops=1e11)
    assert r["skipped"].startswith("needs stochastic length")
    assert started == []


def test_long_table_reports_the_4k_to_16k_cost() -> None:
    def row(name, seconds, mem):
        return {"preset": name, "mean_tokens": 1.0, "step_s": seconds, "peak_rss_gib": mem + 0.5,
                "step_memory_gib": mem, "note": "n"}

    text = bench._long_table([row("long_window1024_4k", 1.0, 0.5), row("long_window1024_16k", 4.2, 2.0),
                              {"preset": "long_full_64k", "skipped": "needs ~900 s per step"}])
    assert "window1024   time x4.20, step memory x4.00" in text
    assert "long_full_64k            skipped: needs ~900 s per step" in text


def test_out_of_memory_is_told_from_other_errors() -> None:
    assert bench._is_out_of_memory(RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
        "tried to allocate 34359738368 bytes"))
    assert bench._is_out_of_memory(MemoryError())
    assert not bench._is_out_of_memory(RuntimeError("shape mismatch"))


def test_open_stream_folder_drifts_over_its_catalogue(tmp_path):
    """--presets stream-open's stream: partitions in time order, ids within the catalogue and
    the population, most of both seen over the stream (the active windows slide)."""
    import os

    import numpy as np
    import pyarrow.parquet as pq

    from hstu.bench import open_stream_folder

    folder, info = open_stream_folder(6000, 1000, 200, 1000, root=str(tmp_path))
    parts = sorted(p for p in os.listdir(folder) if p.startswith("part-"))
    assert len(parts) == 6 and info["events"] == 6000
    tables = [pq.read_table(os.path.join(folder, p, "part-0.parquet")).to_pydict() for p in parts]
    times = np.concatenate([t["timestamp"] for t in tables])
    items = np.concatenate([t["item_id"] for t in tables])
    users = np.concatenate([t["user_id"] for t in tables])
    assert (np.diff(times) >= 0).all()
    assert items.min() >= 0 and items.max() < 1000 and users.max() < 200
    assert len(np.unique(items)) > 500 and len(np.unique(users)) > 150
    # the catalogue drifts: the last partition's items are mostly new to the first one's
    first, last = set(tables[0]["item_id"]), set(tables[-1]["item_id"])
    assert len(last - first) > len(last) / 2
    assert open_stream_folder(6000, 1000, 200, 1000, root=str(tmp_path))[0] == folder  # reused


def test_clicks_folder_keeps_the_events_and_reads_the_click_bit(tmp_path):
    """--presets stream-vs-open feeds the open preset the closed preset's label: bit 0 of
    KuaiRand's action bitmask as 0 / 1, every other column and file as it was."""
    import os

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "kuairand-1k-6-by-3"
    ratings = [[65.0, 0.0, 3.0], [2.0, 1.0, 64.0]]
    for k, r in enumerate(ratings):
        part = folder / f"part-{k:06d}"
        part.mkdir(parents=True)
        pq.write_table(pa.table({"user_id": [1, 2, 3], "item_id": [7, 8, 9 + k],
                                 "timestamp": [10 * k, 10 * k + 1, 10 * k + 2], "rating": r}),
                       str(part / "part-0.parquet"))
        (part / "_SUCCESS").touch()
    (folder / "_bench.json").write_text("{}")
    out = bench._clicks_folder(str(folder))
    assert sorted(os.listdir(out)) == ["_bench.json", "part-000000", "part-000001"]
    for k, r in enumerate(ratings):
        assert os.path.exists(os.path.join(out, f"part-{k:06d}", "_SUCCESS"))
        got = pq.read_table(os.path.join(out, f"part-{k:06d}", "part-0.parquet")).to_pydict()
        assert got["rating"] == [int(x) % 2 for x in r]  # 65 -> 1, 64 -> 0, 3 -> 1
        assert got["item_id"] == [7, 8, 9 + k] and got["user_id"] == [1, 2, 3]
        assert np.diff(got["timestamp"]).min() == 1
    assert bench._clicks_folder(str(folder)) == out  # built once
