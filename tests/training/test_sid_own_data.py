"""docs/own_data.md "Semantic ids: your item file, codes, recommendations", command by command
on a generated shop (string ids, an item file with text columns): preprocess, tokenize, train
the semantic-id preset, export, recommend; raw ids out, never a history item, and the top 10
of a user mostly from the category the user clicks."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from tests.training.test_e2e import _env

ROOT = Path(__file__).resolve().parents[2]
CATEGORIES = {
    "shoes": ["sneaker", "boot", "sandal", "loafer", "trainer"],
    "socks": ["sock", "stocking", "anklet", "legging", "tights"],
    "tents": ["tent", "tarp", "bivouac", "shelter", "canopy"],
    "lamps": ["lamp", "lantern", "torch", "headlight", "candle"],
    "mugs": ["mug", "cup", "flask", "kettle", "thermos"],
    "maps": ["map", "atlas", "compass", "guidebook", "chart"],
}
WORDS = ["red", "blue", "light", "heavy", "small", "large", "classic", "pro"]


def _shop(folder: Path) -> tuple[Path, Path, dict[str, str], dict[str, str]]:
    """(clicks.csv, items.csv, item -> category, user -> favourite category)."""
    rng = np.random.default_rng(0)
    items, category_of = [], {}
    for c, nouns in CATEGORIES.items():
        for k in range(20):
            item = f"sku-{c}-{k}"
            items.append((item, f"{WORDS[k % len(WORDS)]} {nouns[k % len(nouns)]} {c}", c))
            category_of[item] = c
    with open(folder / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title", "category"])
        w.writerows(items)
    by_category = defaultdict(list)
    for item, c in category_of.items():
        by_category[c].append(item)
    names = list(CATEGORIES)
    favourite, t = {}, 1_700_000_000
    with open(folder / "clicks.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        for u in range(300):
            user = f"u{u}"
            favourite[user] = names[u % len(names)]
            for _ in range(int(rng.integers(10, 17))):
                pool = by_category[favourite[user]] if rng.random() < 0.9 else list(category_of)
                t += int(rng.integers(1, 60))
                w.writerow([user, pool[int(rng.integers(len(pool)))], t])
    return folder / "clicks.csv", folder / "items.csv", category_of, favourite


def _ok(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, f"{cmd[:4]}:\n{(proc.stdout + proc.stderr)[-5000:]}"
    return proc


@pytest.mark.slow  # five commands, a short training run: ~2 min
def test_own_item_file_to_codes_to_a_trained_model_to_raw_id_recommendations(tmp_path):
    clicks, items, category_of, favourite = _shop(tmp_path)
    data, codes, run_dir = tmp_path / "data", tmp_path / "sid" / "clicks", tmp_path / "run"
    py = sys.executable
    _ok([py, "-m", "hstu.data.preprocess", "--dataset", "custom", "--raw", str(clicks),
         "--name", "clicks", "--out", str(data)])
    _ok([py, "-m", "hstu.sid.tokenize", "--items", str(items), "--text-columns",
         "title,category", "--levels", "2", "--codes", "8", "--out", str(codes)])
    _ok([py, "pretrain_gr_retrieval.py", "--gin-config-file", "configs/ml-100k_sid_retrieval.gin",
         *[a for p in ['DatasetArgs.dataset_name="clicks"',
                       f'DatasetArgs.dataset_path="{data / "clicks"}"',
                       f'NetworkArgs.sid_codes="{codes}"', f'TrainerArgs.run_dir="{run_dir}"',
                       "TrainerArgs.max_train_iters=120", "TrainerArgs.eval_interval=40",
                       "TrainerArgs.log_interval=40", "OptimizerArgs.lr_warmup_iters=8"]
           for a in ("--gin-param", p)]])
    _ok([py, "-m", "hstu.export", "--ckpt", str(run_dir / "best"), "--out",
         str(tmp_path / "art"), "--no-aoti"])
    out = tmp_path / "top10.csv"
    _ok([py, "-m", "hstu.recommend", "--model", str(tmp_path / "art"), "--input", str(clicks),
         "--top-k", "10", "--out", str(out)])
    history = defaultdict(set)
    with open(clicks) as f:
        for row in csv.DictReader(f):
            history[row["user_id"]].add(row["item_id"])
    top = defaultdict(list)
    with open(out) as f:
        for row in csv.DictReader(f):
            top[row["user_id"]].append(row["item_id"])
    assert set(top) == set(favourite)
    same = 0
    for user, got in top.items():
        assert len(got) == 10 and len(set(got)) == 10, (user, got)
        assert all(i in category_of for i in got), got  # raw ids of the item file
        assert not set(got) & history[user], (user, set(got) & history[user])
        same += sum(category_of[i] == favourite[user] for i in got)
    share = same / (10 * len(top))
    # chance is 1/6; the users' next clicks are 90 % their category's (whose unclicked items
    # are often fewer than 10: the rest must come from other categories)
    assert share > 0.4, share
