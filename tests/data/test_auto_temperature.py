"""RetrievalArgs.temperature="auto": the softmax temperature chosen from the catalogue, said in
one line, and what the run is then configured with (configs/cpu_retrieval.gin's setting)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hstu.args import ConfigError, RetrievalArgs
from hstu.data.sizes import AUTO_TEMPERATURES, resolve_sizes, resolve_temperature

ROOT = Path(__file__).resolve().parents[2]


def test_the_temperature_follows_the_catalogue_at_its_limits() -> None:
    limit = AUTO_TEMPERATURES[0][0]
    small, large = AUTO_TEMPERATURES[0][1], AUTO_TEMPERATURES[-1][1]
    assert large < small  # a larger catalogue gets the wider range of logits
    auto = RetrievalArgs(temperature="auto", negative_sampling="full_corpus")
    # ids [first, num_items): the catalogue is num_items - first items
    for items, first, value in ((limit + 1, 1, small), (limit + 2, 1, large),
                                (limit + 5, 5, small), (2, 1, small), (10**6, 1, large)):
        retrieval, line = resolve_temperature(auto, items, first)
        assert retrieval.temperature == value, (items, first)
        assert retrieval.negative_sampling == "full_corpus"  # nothing else changes
        assert line.startswith(f'[hstu] temperature "auto" -> {value:g}: {items - first} items')
    # a fixed temperature is left as it is, without a line; ranking has no retrieval loss
    fixed = RetrievalArgs(temperature=0.2)
    assert resolve_temperature(fixed, 10**6, 1) == (fixed, None)
    assert resolve_temperature(None, 10**6, 1) == (None, None)


@pytest.mark.parametrize("value", ["warm", 0.0, -0.1])
def test_a_temperature_that_is_neither_positive_nor_auto_is_refused(value) -> None:
    with pytest.raises(ConfigError) as err:
        RetrievalArgs(temperature=value)
    assert (err.value.cls_name, err.value.field_name) == ("RetrievalArgs", "temperature")


@pytest.mark.parametrize("num_items", [300, AUTO_TEMPERATURES[0][0] + 200])
def test_the_recipe_builds_its_loss_with_the_temperature_it_chose(
    tmp_path, clean_gin, one_process_group, num_items
) -> None:
    """The entry points' resolution (resolve_sizes) and a run built from Python (build_all,
    which resolves it again) choose the same temperature, and the model's loss divides by it."""
    import torch

    from hstu.config import load_config
    from hstu.data.data_args import CustomDataArgs
    from hstu.data.preprocess import preprocess
    from hstu.training.builder import build_all
    from hstu.training.distributed import DistEnv

    # users of 5 events over every item of the catalogue in turn
    raw = tmp_path / "events.csv"
    rows = ["user_id,item_id,timestamp"]
    for event in range(5 * (num_items // 5 + 1)):
        rows.append(f"u{event // 5},i{event % num_items},{event}")
    raw.write_text("\n".join(rows) + "\n")
    preprocess("custom", raw=raw, out=tmp_path, output_name="own", verbose=False,
               custom=CustomDataArgs(path=str(raw)))
    cfg = load_config(str(ROOT / "configs" / "cpu_retrieval.gin"), [
        f'DatasetArgs.dataset_path="{tmp_path / "own"}"', 'DatasetArgs.dataset_name="own"',
    ], task="retrieval", world_size=1)
    assert cfg.retrieval.temperature == "auto"
    resolved = resolve_sizes(cfg)
    value = AUTO_TEMPERATURES[0][1] if num_items <= AUTO_TEMPERATURES[0][0] \
        else AUTO_TEMPERATURES[-1][1]
    assert resolved.retrieval.temperature == value
    said = f'[hstu] temperature "auto" -> {value:g}: {num_items} items'
    assert any(line.startswith(said) for line in resolved.choices), resolved.choices

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                  backend="gloo", tp_size=1, tp_rank=0, dp_size=1, dp_rank=0, tp_group=None,
                  dp_group=None)
    lines: list[str] = []
    built = build_all(cfg, env, log=lines.append)
    assert any(line.startswith(said) for line in lines), lines
    heads = [m for m in built.model.modules() if hasattr(m, "temperature")]
    assert heads and {m.temperature for m in heads} == {value}
