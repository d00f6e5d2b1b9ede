"""Collaborative codes (issue 52, build item 1, input (c)): the item table of a trained
checkpoint -> codes. Slow tier: it trains the debug retrieval preset two steps first (~30 s on
a CPU) and exports it; the default tier covers the same tokenizer on a vectors file (test_tokenizer.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hstu.sid import load_codes

ROOT = Path(__file__).resolve().parents[2]


def _run(*cmd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.mark.slow
def test_a_checkpoints_item_table_to_codes(tmp_path) -> None:
    run = tmp_path / "run"
    _run(str(ROOT / "pretrain_gr_retrieval.py"), "--gin-config-file", str(ROOT / "configs" / "debug_retrieval.gin"),
         "--gin-param", f'TrainerArgs.run_dir="{run}"',
         "--gin-param", f'DatasetArgs.dataset_path="{tmp_path / "data" / "synthetic"}"',
         "--gin-param", "TrainerArgs.max_train_iters=2", "--gin-param", "TrainerArgs.eval_interval=2",
         "--gin-param", "TrainerArgs.ckpt_save_interval=2",
         "--gin-param", f'TrainerArgs.ckpt_save_dir="{run / "ckpt"}"')
    proc = _run("-m", "hstu.sid.tokenize", "--ckpt", str(run / "ckpt"), "--levels", "2", "--codes", "16",
                "--out", str(tmp_path / "sid"))
    assert "the checkpoint's item table, vectors of dim 16" in proc.stdout, proc.stdout
    assert "collisions:" in proc.stdout
    sid = load_codes(tmp_path / "sid")
    assert sid.config["source"]["kind"] == "checkpoint" and sid.config["dim"] == 16
    assert sid.config["source"]["path"].endswith("iter_2")
    assert len(sid.item_ids) > 100 and len(np.unique(sid.codes, axis=0)) == len(sid.item_ids)
    assert sid.item_ids.min() >= 1  # the padding row 0 is no item
    # the same vectors as the artifact's item_embeddings.parquet: the same codes from --vectors
    _run("-m", "hstu.export", "--ckpt", str(run / "ckpt"), "--out", str(tmp_path / "art"), "--no-aoti")
    _run("-m", "hstu.sid.tokenize", "--vectors", str(tmp_path / "art" / "item_embeddings.parquet"),
         "--levels", "2", "--codes", "16", "--out", str(tmp_path / "sid_art"))
    art = load_codes(tmp_path / "sid_art")
    assert np.array_equal(art.item_ids, sid.item_ids) and np.array_equal(art.codes, sid.codes)
