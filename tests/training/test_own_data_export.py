"""docs/own_data.md's path end to end on a generated shop log of 6,000 items (above the width's
limit: hidden_size and kv_channels "auto" both choose 128): preprocess -> configs/cpu_retrieval.gin
-> python -m hstu.export (sizes resolved again from the dataset) -> python -m hstu.recommend,
whose HR@10 of the held-out items is the trainer's test HR@10."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ITEMS = 6000


def _run(*cmd: str) -> str:
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True,
                          timeout=400, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{cmd[:2]} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


@pytest.mark.slow
def test_the_recipe_trains_exports_and_recommends_on_own_data(tmp_path) -> None:
    raw = tmp_path / "shop.csv"
    rows = ["user_id,item_id,timestamp"]
    for event in range(10 * (ITEMS // 5 + 1)):  # users of 5 events, every item twice
        rows.append(f"u{event // 5},i{(event * 7) % ITEMS},{event}")
    raw.write_text("\n".join(rows) + "\n")
    _run("-m", "hstu.data.preprocess", "--dataset", "custom", "--raw", str(raw), "--name", "shop",
         "--out", str(tmp_path / "tmp_data"))
    run_dir = tmp_path / "run"
    out = _run("pretrain_gr_retrieval.py", "--gin-config-file", "configs/cpu_retrieval.gin",
               "--gin-param", 'DatasetArgs.dataset_name="shop"',
               "--gin-param", f'DatasetArgs.dataset_path="{tmp_path / "tmp_data" / "shop"}"',
               "--gin-param", "TrainerArgs.max_train_epochs=0.5",
               "--gin-param", "TrainerArgs.eval_interval_epochs=0.5",
               "--gin-param", f'TrainerArgs.run_dir="{run_dir}"')
    assert (f'[hstu] hidden_size "auto" -> 128 (kv_channels "auto" follows it): {ITEMS} items, '
            "more than 5,000") in out
    assert f'[hstu] temperature "auto" -> 0.07: {ITEMS} items, more than 5,000' in out
    trained = float(re.search(r"test split, best checkpoint .*?HR@10 ([0-9.]+)", out).group(1))
    art = tmp_path / "artifact"
    _run("-m", "hstu.export", "--ckpt", str(run_dir / "best"), "--out", str(art), "--no-aoti")
    model = json.loads((art / "manifest.json").read_text())["model"]
    assert (model["hidden_size"], model["head_dim"]) == (128, 128)
    top = tmp_path / "top10.csv"
    rec = _run("-m", "hstu.recommend", "--model", str(art), "--input", str(raw), "--out", str(top),
               "--top-k", "10", "--holdout-last", "1")
    users = {line.split(",")[0] for line in top.read_text().splitlines()[1:]}
    assert len(top.read_text().splitlines()) - 1 == 10 * len(users) and len(users) > 2000
    served = float(rec.split("HR@10 of the held-out items ")[1].split()[0])
    assert served == pytest.approx(trained, abs=1e-4)
