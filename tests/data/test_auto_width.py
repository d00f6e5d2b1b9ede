"""NetworkArgs.hidden_size="auto": the width chosen from the catalogue, said in one line, and
what the run is then configured with (configs/cpu_retrieval.gin's setting)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from hstu.args import ConfigError, NetworkArgs
from hstu.data.sizes import AUTO_WIDTHS, resolve_sizes, resolve_width

ROOT = Path(__file__).resolve().parents[2]


def _network(**kw) -> NetworkArgs:
    base = {"num_layers": 2, "hidden_size": "auto", "num_attention_heads": 3, "kv_channels": 50}
    return NetworkArgs(**{**base, **kw})


def test_the_width_follows_the_catalogue_at_its_limits() -> None:
    limit = AUTO_WIDTHS[0][0]
    narrow, wide = AUTO_WIDTHS[0][1], AUTO_WIDTHS[-1][1]
    assert narrow < wide
    # ids [first, num_items): the catalogue is num_items - first items
    for items, first, width in ((limit + 1, 1, narrow), (limit + 2, 1, wide),
                                (limit + 5, 5, narrow), (2, 1, narrow), (10**6, 1, wide)):
        network, line = resolve_width(_network(), "retrieval", items, first)
        assert network.hidden_size == width, (items, first)
        assert line.startswith(f'[hstu] hidden_size "auto" -> {width}: {items - first} items')
        assert network.resolved_item_embedding_dim == width
    # a fixed width is left as it is, without a line
    fixed = _network(hidden_size=64)
    assert resolve_width(fixed, "retrieval", 10**6, 1) == (fixed, None)


def test_auto_head_width_follows_the_width_chosen_or_given() -> None:
    # kv_channels "auto" is the width: "auto" resolves with it (the line says so), a fixed
    # width resolves it at once, and a fixed head width stays as given
    for items, width in ((AUTO_WIDTHS[0][0], AUTO_WIDTHS[0][1]), (10**6, AUTO_WIDTHS[-1][1])):
        network, line = resolve_width(_network(kv_channels="auto"), "retrieval", items + 1, 1)
        assert (network.hidden_size, network.kv_channels) == (width, width)
        assert line.startswith(
            f'[hstu] hidden_size "auto" -> {width} (kv_channels "auto" follows it): {items} items')
    assert _network(kv_channels="auto").kv_channels == "auto"  # until the width is chosen
    assert _network(hidden_size=64, kv_channels="auto").kv_channels == 64
    network, _ = resolve_width(_network(kv_channels=32), "retrieval", 10**6, 1)
    assert network.kv_channels == 32
    with pytest.raises(ConfigError) as err:
        _network(kv_channels="wide")
    assert err.value.field_name == "kv_channels"


def test_auto_width_is_refused_where_it_cannot_hold() -> None:
    with pytest.raises(ConfigError) as err:
        resolve_width(_network(), "ranking", 100, 1)
    assert (err.value.cls_name, err.value.field_name) == ("NetworkArgs", "hidden_size")
    # the semantic-id decoder's heads must divide the width chosen
    sid = dataclasses.replace(_network(), architecture="hstu_sid", sid_codes="codes.parquet",
                              sid_decoder_heads=3)
    with pytest.raises(ConfigError) as err:
        resolve_width(sid, "retrieval", AUTO_WIDTHS[0][0] + 10, 1)
    assert err.value.field_name == "sid_decoder_heads"
    assert f'do not divide hidden_size "auto" = {AUTO_WIDTHS[-1][1]}' in err.value.message
    with pytest.raises(ConfigError) as err:
        _network(hidden_size=0)
    assert err.value.field_name == "hidden_size"


@pytest.mark.parametrize("num_items", [300, AUTO_WIDTHS[0][0] + 200])
def test_the_recipe_is_configured_with_the_width_it_chose(tmp_path, clean_gin, num_items) -> None:
    from hstu.config import load_config
    from hstu.data.data_args import CustomDataArgs
    from hstu.data.preprocess import preprocess

    # users of 5 events over every item of the catalogue in turn
    raw = tmp_path / "events.csv"
    rows = ["user_id,item_id,timestamp"]
    for event in range(5 * (num_items // 5 + 1)):
        rows.append(f"u{event // 5},i{event % num_items},{event}")
    raw.write_text("\n".join(rows) + "\n")
    meta = preprocess("custom", raw=raw, out=tmp_path, output_name="own", verbose=False,
                      custom=CustomDataArgs(path=str(raw)))
    assert meta["num_items"] - 1 == num_items
    cfg = load_config(str(ROOT / "configs" / "cpu_retrieval.gin"), [
        f'DatasetArgs.dataset_path="{tmp_path / "own"}"', 'DatasetArgs.dataset_name="own"',
    ], task="retrieval", world_size=2)
    assert cfg.network.hidden_size == "auto"
    resolved = resolve_sizes(cfg)
    width = AUTO_WIDTHS[0][1] if num_items <= AUTO_WIDTHS[0][0] else AUTO_WIDTHS[-1][1]
    assert (resolved.network.hidden_size, resolved.network.kv_channels) == (width, width)
    assert (f'[hstu] hidden_size "auto" -> {width} (kv_channels "auto" follows it): '
            f'{num_items} items') in resolved.choices[0]
