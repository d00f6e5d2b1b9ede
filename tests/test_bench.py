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
