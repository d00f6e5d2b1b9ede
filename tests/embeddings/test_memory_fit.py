"""The estimate before the plan: tables that cannot fit a rank even spread evenly are
refused in one line with the numbers, before anything is allocated; the figure is a lower
bound of what every rank holds (the check per rank from the plan: test_built_in_place.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hstu.args import DynamicEmbeddingArgs, EmbeddingArgs
from hstu.console import format_bytes
from hstu.embeddings.collection import INIT_BYTES_PER_VALUE, INIT_CHUNK_VALUES
from hstu.embeddings.sharding import REMAPPER_BYTES_PER_ROW, check_tables_fit
from hstu.validation import ConfigError

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30


def _item(rows: int, sharding: str = "model_parallel") -> EmbeddingArgs:
    return EmbeddingArgs(feature_names=["item"], table_name="item_table",
                         item_vocab_size_or_capacity=rows, sharding_type=sharding)


# the init chunk: starting values are drawn INIT_CHUNK_VALUES at a time, at up to
# INIT_BYTES_PER_VALUE transient bytes each (for tables of at least one chunk)
CHUNK = INIT_CHUNK_VALUES * INIT_BYTES_PER_VALUE


def test_the_figure_counts_the_rank_share_of_values_and_optimizer_state() -> None:
    # 4,369,953 x 64 float32 = 1.04 GiB of values; Adam's 2 x 64 values per row; all over 2 ranks
    rows, dim = 4_369_953, 64
    need = check_tables_fit([_item(rows)], {"item_table": dim}, "adam", 2, (100 * GIB, "test"))
    assert need == (rows * dim * 4 + rows * 2 * dim * 4) // 2 + CHUNK
    # replicated tables keep all of their values and state on every rank; row-wise Adagrad: 1 value a row
    need = check_tables_fit([_item(rows, "data_parallel")], {"item_table": dim}, "rowwise_adagrad", 2,
                            (100 * GIB, "test"))
    assert need == rows * dim * 4 + rows * 4 + CHUNK


def test_the_weight_average_counts_a_copy_of_the_rank_s_values() -> None:
    # TrainerArgs.ema_decay: one float32 copy of the rank's share of the values
    rows, dim = 4_369_953, 64
    need = check_tables_fit([_item(rows)], {"item_table": dim}, "adam", 2, (100 * GIB, "test"),
                            weight_average=True)
    assert need == (rows * dim * 4 + rows * 2 * dim * 4 + rows * dim * 4) // 2 + CHUNK
    need = check_tables_fit([_item(rows, "data_parallel")], {"item_table": dim}, "sgd", 2,
                            (100 * GIB, "test"), weight_average=True)
    assert need == 2 * rows * dim * 4 + CHUNK
    with pytest.raises(ConfigError, match="state and the weight average"):
        check_tables_fit([_item(rows)], {"item_table": dim}, "adam", 1, (GIB, "test"),
                         weight_average=True)


def test_a_dynamic_table_counts_its_capacity_and_its_remapper() -> None:
    dyn = DynamicEmbeddingArgs(feature_names=["item"], table_name="item_table",
                               item_vocab_size_or_capacity=10**9, item_vocab_gpu_capacity=1_000_000)
    need = check_tables_fit([dyn], {"item_table": 32}, "sgd", 1, (100 * GIB, "test"))
    assert need == 1_000_000 * (32 * 4 + REMAPPER_BYTES_PER_ROW) + CHUNK
    # over 2 ranks: half of the values, the remapper whole (replicated)
    need = check_tables_fit([dyn], {"item_table": 32}, "sgd", 2, (100 * GIB, "test"))
    assert need == 1_000_000 * 32 * 4 // 2 + 1_000_000 * REMAPPER_BYTES_PER_ROW + CHUNK


def test_a_small_table_counts_a_small_chunk_and_prints_in_a_unit_that_fits() -> None:
    need = check_tables_fit([_item(1000)], {"item_table": 8}, "sgd", 1, (100 * GIB, "test"))
    assert need == 1000 * 8 * 4 + 1000 * 8 * INIT_BYTES_PER_VALUE
    assert format_bytes(need) == f"{need / 2**10:.1f} KiB"
    assert format_bytes(3 * 2**20) == "3.0 MiB" and format_bytes(5 * GIB) == "5.00 GiB"
    assert format_bytes(12) == "12 B"


def test_a_table_that_cannot_fit_is_one_line_with_the_numbers() -> None:
    with pytest.raises(ConfigError) as err:
        check_tables_fit([_item(4_369_953)], {"item_table": 512}, "adam", 1, (6 * GIB, "host MemAvailable / 1 local rank(s)"))
    line = str(err.value)
    table = 4_369_953 * 512 * 4 * 3  # values and Adam's two moments
    assert "\n" not in line
    assert f"need at least {(table + CHUNK) / GIB:.2f} GiB per rank" in line
    assert f"item_table 4,369,953 x 512 = {table / GIB:.2f} GiB" in line
    assert "a rank has 6.00 GiB (host MemAvailable / 1 local rank(s))" in line
    assert "item_embedding_dim" in line


def test_the_trainer_refuses_before_allocating(tmp_path) -> None:
    # items of 100M floats each: terabytes, refused before any table is built
    run = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_gr_retrieval.py"), "--gin-config-file",
         str(ROOT / "configs" / "debug_retrieval.gin"),
         "--gin-param", f'DatasetArgs.dataset_path="{tmp_path / "synthetic"}"',
         "--gin-param", f'TrainerArgs.run_dir="{tmp_path / "run"}"',
         "--gin-param", "NetworkArgs.item_embedding_dim=100000000"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert run.returncode == 2, (run.stdout + run.stderr)[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: EmbeddingArgs: the embedding tables need at least") and "GiB per rank" in last, last


def test_a_host_that_does_not_say_its_memory_refuses_nothing(monkeypatch) -> None:
    import builtins

    import torch

    from hstu.embeddings.sharding import available_bytes_per_rank

    real_open = builtins.open

    def no_meminfo(path, *args, **kwargs):
        if str(path) == "/proc/meminfo":
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_meminfo)
    avail = available_bytes_per_rank(torch.device("cpu"))
    assert avail[0] is None and "no /proc/meminfo" in avail[1]
    # terabytes of tables: the figure is still returned, nothing is refused
    need = check_tables_fit([_item(10**9)], {"item_table": 512}, "sgd", 1, avail)
    assert need == 10**9 * 512 * 4 + CHUNK
