"""Sizes from the data (issue 14): "auto" table rows, action classes and ranking head width
resolve from the preprocessed metadata before any process starts; a fixed size that is too
small fails at --check-config in one line naming the gin binding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hstu.args import ConfigError
from hstu.config import load_config
from hstu.data.sizes import resolve_sizes
from tests.data.helpers import preprocess_shop

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("clean_gin")


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    """A CSV with string ids and half-star ratings, preprocessed as 'shop' (12 items, 4 classes)."""
    return preprocess_shop(tmp_path_factory.mktemp("sizes"), [1.5, 3.0, 4.5, 5.0])


TABLE = ['item/EmbeddingArgs.table_name="item"', 'item/EmbeddingArgs.feature_names=["item_id"]',
         'item/EmbeddingArgs.sharding_type="data_parallel"']


def _params(shop: Path, *extra: str) -> list[str]:
    return ['DatasetArgs.dataset_name="shop"', f'DatasetArgs.dataset_path="{shop}"', *extra]


def test_auto_sizes_resolve_from_the_metadata(shop):
    cfg = load_config(str(ROOT / "configs" / "debug_ranking.gin"),
                      _params(shop, *TABLE, 'item/EmbeddingArgs.item_vocab_size_or_capacity="auto"'),
                      task="ranking")
    assert cfg.tables[0].item_vocab_size_or_capacity == "auto"
    assert cfg.ranking.prediction_head_arch == [16, "auto"]
    cfg = resolve_sizes(cfg)
    assert cfg.tables[0].item_vocab_size_or_capacity == 13  # 12 items, dense ids 1..12
    assert cfg.ranking.prediction_head_arch == [16, 4]  # 1.5, 3.0, 4.5, 5.0 -> 4 classes
    # left out: the same size
    cfg = resolve_sizes(load_config(str(ROOT / "configs" / "debug_ranking.gin"), _params(shop, *TABLE),
                                    task="ranking"))
    assert cfg.tables[0].item_vocab_size_or_capacity == 13


def test_too_small_fixed_size_is_one_line_naming_the_binding(shop, tmp_path):
    preset = tmp_path / "mine.gin"
    preset.write_text(
        f'include "{ROOT / "configs" / "debug_retrieval.gin"}"\n'
        + "\n".join(_params(shop)) + "\n" + "\n".join(TABLE) + "\n"
        + "item/EmbeddingArgs.item_vocab_size_or_capacity = 10\n"
    )
    cfg = load_config(str(preset), task="retrieval")
    with pytest.raises(ConfigError, match=rf"^{preset}:7: EmbeddingArgs.item_vocab_size_or_capacity: "
                                          r"table 'item' has 10 rows but dataset shop needs 13"):
        resolve_sizes(cfg)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_gr_retrieval.py"), "--gin-config-file", str(preset),
         "--check-config"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        (f"error: {preset}:7: EmbeddingArgs.item_vocab_size_or_capacity: table 'item' has 10 rows "
         'but dataset shop needs 13 (max id + 1); set it to "auto" (the size of the data) or at '
         "least that")
    ]


def test_narrow_ranking_head_fails_at_check_config(shop):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_gr_ranking.py"), "--gin-config-file",
         str(ROOT / "configs" / "debug_ranking.gin"), "--check-config",
         *[a for p in _params(shop, "RankingArgs.prediction_head_arch=[16, 3]") for a in ("--gin-param", p)]],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: --gin-param 'RankingArgs.prediction_head_arch=[16, 3]': RankingArgs.")
    assert "narrower than the 4 action classes of shop" in line


def test_check_config_prints_the_resolved_sizes(shop):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_gr_ranking.py"), "--gin-config-file",
         str(ROOT / "configs" / "debug_ranking.gin"), "--check-config",
         *[a for p in _params(shop) for a in ("--gin-param", p)]],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"sizes from {shop}: tables item 13, action 4, user_id 7; ranking head [16, 4]" in proc.stdout
    assert proc.stdout.rstrip().endswith("configuration OK")


def test_unknown_dataset_name_without_a_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"'shopp' is not one of .* nor preprocessed data in"):
        load_config(str(ROOT / "configs" / "debug_retrieval.gin"), ['DatasetArgs.dataset_name="shopp"'])


def test_a_built_in_dataset_not_preprocessed_names_its_own_command(tmp_path, monkeypatch):
    """The line for a missing preprocessed dataset: a built-in one is preprocessed by its own
    reader (--dataset ml-1m --raw PATH), not as a custom file."""
    from hstu.args import DatasetArgs
    from hstu.data.errors import DataError
    from hstu.data.sizes import read_metadata

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        read_metadata(DatasetArgs(dataset_name="ml-1m", max_sequence_length=50))
    assert str(err.value).endswith("python -m hstu.data.preprocess --dataset ml-1m --raw PATH")
