"""configs/cpu_retrieval.gin, the recipe that sizes itself, on the real MovieLens-100K under
torchrun (2 gloo processes): each choice it makes is a line of its log and is what it runs,
the exact softmax below its catalogue limit and the logQ-corrected sampled softmax above it
(read from ../shared/data; skipped with a reason when absent)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from hstu.data.preprocess import preprocess
from tests.data.helpers import ML100K_RAW, needs_ml100k
from tests.training.test_e2e import losses, run_job

RAW = ML100K_RAW
pytestmark = needs_ml100k


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recipe")
    preprocess("ml-100k", RAW, out / "data", verbose=False)
    return out


def _recipe(tmp: Path, name: str, *params: str) -> dict:
    return run_job(tmp, name, preset="cpu_retrieval.gin", timeout=400, params=[
        f'DatasetArgs.dataset_path="{tmp / "data" / "ml-100k"}"',
        "DatasetArgs.max_sequence_length=20", "TrainerArgs.max_train_epochs=1.5",
        "TrainerArgs.eval_interval_epochs=0.5", "TrainerArgs.log_interval=1", *params,
    ])


@pytest.mark.parametrize("limit", [pytest.param(20000, marks=pytest.mark.slow), 1000])
def test_the_recipe_says_what_it_chose_and_runs_it(tmp, limit) -> None:
    run = _recipe(tmp, f"limit{limit}", f"RetrievalArgs.full_corpus_max_items={limit}")
    out = run["out"]
    assert ('[hstu] hidden_size "auto" -> 50 (kv_channels "auto" follows it): 1682 items, at '
            "most 5,000") in out
    # 943 users: the small side of the dropout's limit
    assert '[hstu] hidden_dropout "auto" -> 0.5: 943 sequences, at most 2,000' in out
    if limit >= 1682:
        assert ('negative_sampling "auto" -> \'full_corpus\': the exact softmax: 1682 items, at '
                f"most full_corpus_max_items = {limit}") in out
    else:
        assert ('negative_sampling "auto" -> \'mixed_logq\': 1682 items, more than '
                "full_corpus_max_items = 1000: in-batch plus 1024 uniform negatives") in out
    per_epoch = int(re.search(r"(\d+) steps/epoch", out).group(1))
    total = math.ceil(1.5 * per_epoch)
    assert f"run length: 1.5 epochs = {total} steps" in out
    loss = losses(run["metrics"])
    assert sorted(loss) == list(range(1, total + 1))
    assert "test split, best checkpoint" in out
