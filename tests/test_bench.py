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
