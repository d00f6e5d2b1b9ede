"""NetworkArgs.hidden_dropout="auto": the dropout chosen from the data's mean history length,
said in one line, and the model built with it (configs/cpu_retrieval.gin's setting)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hstu.args import ConfigError, NetworkArgs
from hstu.data.sizes import AUTO_DROPOUTS, resolve_dropout, resolve_sizes

ROOT = Path(__file__).resolve().parents[2]


def _network(**kw) -> NetworkArgs:
    base = {"num_layers": 2, "hidden_size": 50, "num_attention_heads": 3, "kv_channels": 50,
            "hidden_dropout": "auto"}
    return NetworkArgs(**{**base, **kw})


def _info(mean: float | None) -> SimpleNamespace:
    meta = {} if mean is None else {"seqlen": {"mean": mean, "max": 200, "min": 2}}
    return SimpleNamespace(dataset_name="own", metadata=meta)


def test_the_dropout_follows_the_mean_history_at_its_limit() -> None:
    limit, sparse = AUTO_DROPOUTS[0]
    dense = AUTO_DROPOUTS[-1][1]
    assert sparse != dense
    for mean, dropout in ((2.0, sparse), (limit, sparse), (limit + 0.01, dense), (165.6, dense)):
        network, line = resolve_dropout(_network(), _info(mean))
        assert network.hidden_dropout == dropout, mean
        assert line.startswith(f'[hstu] hidden_dropout "auto" -> {dropout:g}: {mean:g} events '
                               "a sequence on average")
    # a fixed dropout is left as it is, without a line, whatever the data
    fixed = _network(hidden_dropout=0.3)
    assert resolve_dropout(fixed, _info(None)) == (fixed, None)


def test_auto_dropout_without_the_mean_length_is_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_dropout(_network(), _info(None))
    assert (err.value.cls_name, err.value.field_name) == ("NetworkArgs", "hidden_dropout")
    assert "metadata.json (seqlen.mean)" in err.value.message
    with pytest.raises(ConfigError) as err:
        _network(hidden_dropout=1.0)
    assert err.value.field_name == "hidden_dropout"


def _own_data(tmp_path: Path, events_a_user: int) -> Path:
    from hstu.data.data_args import CustomDataArgs
    from hstu.data.preprocess import preprocess

    raw = tmp_path / "events.csv"
    rows = ["user_id,item_id,timestamp"]
    for event in range(40 * events_a_user):  # 40 users over 60 items
        rows.append(f"u{event // events_a_user},i{event % 60},{event}")
    raw.write_text("\n".join(rows) + "\n")
    meta = preprocess("custom", raw=raw, out=tmp_path, output_name="own", verbose=False,
                      custom=CustomDataArgs(path=str(raw)))
    assert meta["seqlen"]["mean"] == events_a_user
    return tmp_path / "own"


@pytest.mark.parametrize("events_a_user", [5, 30])
def test_the_recipe_builds_its_model_with_the_dropout_it_chose(
    tmp_path, clean_gin, one_process_group, events_a_user
) -> None:
    """The entry points' resolution (resolve_sizes) and a run built from Python (build_all,
    which resolves it again) choose the same dropout, and every dropout of the model built
    has it."""
    from hstu.config import load_config
    from hstu.training.builder import build_all
    from hstu.training.distributed import DistEnv

    path = _own_data(tmp_path, events_a_user)
    cfg = load_config(str(ROOT / "configs" / "cpu_retrieval.gin"), [
        f'DatasetArgs.dataset_path="{path}"', 'DatasetArgs.dataset_name="own"',
    ], task="retrieval", world_size=1)
    assert cfg.network.hidden_dropout == "auto"
    expected = next(d for limit, d in AUTO_DROPOUTS if limit is None or events_a_user <= limit)
    resolved = resolve_sizes(cfg)
    assert resolved.network.hidden_dropout == expected
    assert any(line.startswith(f'[hstu] hidden_dropout "auto" -> {expected:g}: '
                               f"{events_a_user:g} events a sequence")
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
