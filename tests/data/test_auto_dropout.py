"""NetworkArgs.hidden_dropout="auto" and OptimizerArgs.learning_rate="auto": the dropout and the
peak learning rate chosen from the number of sequences in the data, each said in one line, and
the model and optimizer built with them (configs/cpu_retrieval.gin's settings)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hstu.args import ConfigError, NetworkArgs, OptimizerArgs
from hstu.data.sizes import (
    AUTO_DROPOUTS,
    AUTO_LEARNING_RATES,
    resolve_dropout,
    resolve_learning_rate,
    resolve_sizes,
)

ROOT = Path(__file__).resolve().parents[2]


def _network(**kw) -> NetworkArgs:
    base = {"num_layers": 2, "hidden_size": 50, "num_attention_heads": 3, "kv_channels": 50,
            "hidden_dropout": "auto"}
    return NetworkArgs(**{**base, **kw})


def _info(sequences: int) -> SimpleNamespace:
    return SimpleNamespace(dataset_name="own", num_users=sequences)


def _expected(sequences: int) -> float:
    return next(d for limit, d in AUTO_DROPOUTS if limit is None or sequences <= limit)


def test_the_dropout_follows_the_number_of_sequences_at_its_limit() -> None:
    limit, few = AUTO_DROPOUTS[0]
    many = AUTO_DROPOUTS[-1][1]
    assert few > many  # a small dataset is regularised harder
    for sequences, dropout in ((1, few), (943, few), (limit, few), (limit + 1, many),
                               (14385, many)):
        network, line = resolve_dropout(_network(), _info(sequences))
        assert network.hidden_dropout == dropout, sequences
        assert line.startswith(f'[hstu] hidden_dropout "auto" -> {dropout:g}: {sequences} '
                               "sequences, ")
    # a fixed dropout is left as it is, without a line, whatever the data
    fixed = _network(hidden_dropout=0.3)
    assert resolve_dropout(fixed, _info(0)) == (fixed, None)


def test_auto_dropout_without_the_sequence_count_is_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_dropout(_network(), _info(0))
    assert (err.value.cls_name, err.value.field_name) == ("NetworkArgs", "hidden_dropout")
    assert "metadata.json (num_users)" in err.value.message
    with pytest.raises(ConfigError) as err:
        _network(hidden_dropout=1.0)
    assert err.value.field_name == "hidden_dropout"


def _lr(sequences: int) -> float:
    return next(r for limit, r in AUTO_LEARNING_RATES if limit is None or sequences <= limit)


def test_the_learning_rate_follows_the_number_of_sequences_at_its_limit() -> None:
    limit, few = AUTO_LEARNING_RATES[0]
    many = AUTO_LEARNING_RATES[-1][1]
    assert many > few  # fewer epochs in the budget: a higher rate
    auto = OptimizerArgs(optimizer_str="adam", learning_rate="auto")
    for sequences, rate in ((1, few), (943, few), (limit, few), (limit + 1, many),
                            (6040, many)):
        opt, line = resolve_learning_rate(auto, _info(sequences))
        assert opt.learning_rate == rate and opt.adam_beta1 == auto.adam_beta1, sequences
        assert line.startswith(f'[hstu] learning_rate "auto" -> {rate:g}: {sequences} '
                               "sequences, ")
    fixed = OptimizerArgs(optimizer_str="adam", learning_rate=1e-3)
    assert resolve_learning_rate(fixed, _info(0)) == (fixed, None)
    with pytest.raises(ConfigError) as err:
        resolve_learning_rate(auto, _info(0))
    assert (err.value.cls_name, err.value.field_name) == ("OptimizerArgs", "learning_rate")
    assert "metadata.json (num_users)" in err.value.message
    for bad in ("fast", -1.0):
        with pytest.raises(ConfigError) as err:
            OptimizerArgs(optimizer_str="adam", learning_rate=bad)
        assert err.value.field_name == "learning_rate"


def _own_data(tmp_path: Path, users: int) -> Path:
    from hstu.data.data_args import CustomDataArgs
    from hstu.data.preprocess import preprocess

    raw = tmp_path / "events.csv"
    rows = ["user_id,item_id,timestamp"]
    for event in range(5 * users):  # 5 events a user over 60 items
        rows.append(f"u{event // 5},i{event % 60},{event}")
    raw.write_text("\n".join(rows) + "\n")
    meta = preprocess("custom", raw=raw, out=tmp_path, output_name="own", verbose=False,
                      custom=CustomDataArgs(path=str(raw)))
    assert meta["num_users"] == users
    return tmp_path / "own"


@pytest.mark.parametrize("users", [40, AUTO_DROPOUTS[0][0] + 60])
def test_the_recipe_builds_its_model_with_the_dropout_it_chose(
    tmp_path, clean_gin, one_process_group, users
) -> None:
    """The entry points' resolution (resolve_sizes) and a run built from Python (build_all,
    which resolves it again) choose the same dropout, and every dropout of the model built
    has it."""
    from hstu.config import load_config
    from hstu.training.builder import build_all
    from hstu.training.distributed import DistEnv

    path = _own_data(tmp_path, users)
    cfg = load_config(str(ROOT / "configs" / "cpu_retrieval.gin"), [
        f'DatasetArgs.dataset_path="{path}"', 'DatasetArgs.dataset_name="own"',
    ], task="retrieval", world_size=1)
    assert cfg.network.hidden_dropout == "auto" and cfg.optimizer.learning_rate == "auto"
    expected = _expected(users)
    resolved = resolve_sizes(cfg)
    assert resolved.network.hidden_dropout == expected
    assert resolved.optimizer.learning_rate == _lr(users)
    assert any(line.startswith(f'[hstu] hidden_dropout "auto" -> {expected:g}: {users} '
                               "sequences")
               for line in resolved.choices), resolved.choices

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                  backend="gloo", tp_size=1, tp_rank=0, dp_size=1, dp_rank=0, tp_group=None,
                  dp_group=None)
    lines: list[str] = []
    built = build_all(cfg, env, log=lines.append)
    assert cfg.network.hidden_dropout == expected
    assert any(f'hidden_dropout "auto" -> {expected:g}' in line for line in lines), lines
    dropouts = [m.p for m in built.model.modules() if isinstance(m, torch.nn.Dropout)]
    # the input dropout and one per layer, at least
    assert len(dropouts) >= 1 + cfg.network.num_layers
    assert set(dropouts) == {expected}
    # the optimizer peaks at the rate chosen (its schedule scales from it)
    assert cfg.optimizer.learning_rate == _lr(users)
    assert any(f'learning_rate "auto" -> {_lr(users):g}' in line for line in lines), lines
    assert built.optimizer.args.learning_rate == _lr(users)
