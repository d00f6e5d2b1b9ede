"""--check-config checks what the run checks before its first step (issue 30, point 4), and
bindings or checkpoints that would change a run without a word are named (point 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hstu.cli import main
from tests.test_sizes import shop  # noqa: F401 - the preprocessed 'shop' dataset fixture

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


pytestmark = pytest.mark.usefixtures("plain_process")


def check_config(capsys, task: str, preset: str, *argv: str) -> tuple[int, str, str]:
    """``--check-config`` of preset ``configs/<preset>``: (exit code, stdout, stderr)."""
    code = main(task, ["--gin-config-file", str(CONFIGS / preset), "--check-config", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_tensor_parallel_larger_than_the_world_is_refused(capsys) -> None:
    code, _, err = check_config(capsys, "ranking", "tp2_ranking.gin")
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {CONFIGS / 'tp2_ranking.gin'}:10: "), line
    assert "tensor_model_parallel_size: 2 does not divide the world size 1" in line
    assert "--world-size" in line
    code, out, err = check_config(capsys, "ranking", "tp2_ranking.gin", "--world-size", "2")
    assert code == 0 and "configuration OK" in out, err


def test_a_batch_past_the_kernels_token_limit_is_refused(capsys) -> None:
    code, _, err = check_config(capsys, "retrieval", "debug_retrieval.gin",
                          "--gin-param", "TrainerArgs.train_batch_size=99999999999999999999")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "TrainerArgs.train_batch_size: 99,999,999,999,999,999,999 samples" in line, line
    assert "32-bit offsets" in line


def test_dataset_name_that_does_not_match_its_folder_is_refused(capsys, shop) -> None:  # noqa: F811
    code, _, err = check_config(
        capsys, "retrieval", "debug_retrieval.gin",
        "--gin-param", 'DatasetArgs.dataset_name="ml-100k"',
        "--gin-param", f'DatasetArgs.dataset_path="{shop}"',
    )
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "DatasetArgs.dataset_name: is 'ml-100k' but" in line and "holds 'shop'" in line, line


@pytest.mark.parametrize("task, preset, other", [
    ("retrieval", "debug_ranking.gin", "ranking"), ("ranking", "debug_retrieval.gin", "retrieval"),
])
def test_an_entry_point_refuses_the_other_tasks_configuration(capsys, task, preset, other) -> None:
    code, out, err = check_config(capsys, task, preset)
    assert code == 2 and "configuration OK" not in out
    line = err.strip().splitlines()[-1]
    assert f"a {other} configuration" in line and f"pretrain_gr_{other}.py" in line, line
    assert line.startswith(f"error: {CONFIGS / preset}:"), line


def test_a_binding_under_a_scope_nothing_reads_is_named(capsys) -> None:
    code, out, err = check_config(capsys, "retrieval", "debug_retrieval.gin",
                            "--gin-param", "scope/DatasetArgs.shuffle=False")
    assert code == 0 and "configuration OK" in out
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1, err
    assert "scope/DatasetArgs.shuffle" in warnings[0] and "ignored" in warnings[0]
    # table declarations and referenced scopes are used: no warning for presets that have them
    for task in ("ranking", "retrieval"):
        assert main(task, ["--gin-config-file", str(CONFIGS / f"benchmark_{task}.gin"),
                           "--check-config"]) == 0
        _, err = capsys.readouterr()
        assert "warning: " not in err, err


def test_network_differences_name_every_field_that_changes_the_function() -> None:
    import dataclasses

    from hstu.args import NetworkArgs
    from hstu.training.checkpoint_manager import network_differences

    saved = NetworkArgs(num_layers=1, hidden_size=16, num_attention_heads=2, kv_channels=8)
    now = dataclasses.replace(saved, num_attention_heads=4, kv_channels=4, hidden_dropout=0.5,
                              kernel_backend="pytorch", dtype_str="float32")
    diff = network_differences(dataclasses.asdict(saved), now)
    assert diff == ["kv_channels=8 -> 4", "num_attention_heads=2 -> 4"]
    assert network_differences(None, now) == []  # written before the arguments were saved


def _heads_changed(rank: int, world_size: int, tmp: str) -> None:
    from hstu.config import load_config
    from hstu.training.checkpoint import CheckpointError
    from hstu.training.distributed import init_distributed, set_seed
    from hstu.training.trainer import Trainer

    common = [f'DatasetArgs.dataset_path="{tmp}/data/synthetic"',
              f'TrainerArgs.ckpt_save_dir="{tmp}/ckpt"', "TrainerArgs.max_train_iters=2",
              "TrainerArgs.ckpt_save_interval=2", "TrainerArgs.max_eval_iters=1"]
    trainers = []
    for heads, kv, load in ((2, 8, ""), (4, 4, "auto")):  # the same tensor shapes
        cfg = load_config(str(CONFIGS / "debug_retrieval.gin"), [
            *common, f"NetworkArgs.num_attention_heads={heads}", f"NetworkArgs.kv_channels={kv}",
            f'TrainerArgs.ckpt_load_dir="{load}"'], task="retrieval")
        env = init_distributed(1)
        set_seed(cfg.trainer.seed)
        if not load:
            trainer = Trainer(cfg, env, f"{tmp}/first", "")
            trainers.append(trainer)
            trainer.train()
            continue
        with pytest.raises(CheckpointError) as info:
            Trainer(cfg, env, f"{tmp}/second", "")
        text = str(info.value)
        assert "kv_channels=8 -> 4, num_attention_heads=2 -> 4" in text, text
    for trainer in trainers:
        trainer.close()


def test_a_checkpoint_of_other_heads_is_refused_not_loaded(tmp_path) -> None:
    from tests.dist_utils import run_multiprocess

    run_multiprocess(_heads_changed, world_size=1, tmp=str(tmp_path))



@pytest.fixture(scope="module")
def shop_with_region(tmp_path_factory) -> Path:
    """'shop' with a contextual feature per user (region; the user id is the other one)."""
    from tests.data.helpers import preprocess_shop

    return preprocess_shop(tmp_path_factory.mktemp("peer"), [1.5, 3.0], region=True)


PEER = ("--gin-param", "NetworkArgs.mask_convention='peer'")
PEER_LINE = (
    "NetworkArgs.mask_convention: \"peer\" lets the {n} contextual token(s) see the whole "
    "history, so from layer 2 on each supervised history position sees the next item through "
    "them; use \"hstu\", one layer, or no contextual features"
)


def test_peer_mask_is_refused_where_history_would_see_its_label(capsys, shop_with_region) -> None:
    """Contextual tokens that see the whole history pass it on to every history position
    from layer 2 on: refused for retrieval at gin time (synthetic contextual features) and
    against the data's contextual features; one layer, or none of them, loads."""
    code, _, err = check_config(capsys, "retrieval", "benchmark_retrieval.gin", *PEER)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line == "error: --gin-param \"NetworkArgs.mask_convention='peer'\": " + PEER_LINE.format(n=1)
    code, out, err = check_config(capsys, "retrieval", "benchmark_retrieval.gin", *PEER,
                            "--gin-param", "NetworkArgs.num_layers=1")
    assert code == 0 and "configuration OK" in out, err
    data = ("--gin-param", 'DatasetArgs.dataset_name="shop"',
            "--gin-param", f'DatasetArgs.dataset_path="{shop_with_region}"',
            "--gin-param", "NetworkArgs.num_layers=2")
    code, _, err = check_config(capsys, "retrieval", "debug_retrieval.gin", *data, *PEER)
    assert code == 2, err
    assert err.strip().splitlines()[-1].endswith(PEER_LINE.format(n=2)), err  # user id, region
    code, out, err = check_config(capsys, "retrieval", "debug_retrieval.gin", *data, *PEER,
                            "--gin-param", "DatasetArgs.contextual_features=[]")
    assert code == 0 and "configuration OK" in out, err


@pytest.mark.parametrize("task, preset, extra, why", [
    ("ranking", "debug_ranking.gin", [], "retrieval only"),
    ("retrieval", "debug_retrieval.gin", [], "needs relative_attention_bias = True and rab_use_time"),
    ("retrieval", "debug_retrieval.gin",
     ["NetworkArgs.relative_attention_bias=True", "NetworkArgs.rab_use_time=False"], "rab_use_time"),
    ("retrieval", "debug_retrieval.gin", ["NetworkArgs.relative_attention_bias=True"],
     "needs DatasetArgs.action_tokens = False"),
])
def test_rab_query_time_is_refused_where_it_cannot_apply(capsys, task, preset, extra, why) -> None:
    argv = ["--gin-param", "NetworkArgs.rab_query_time=True"]
    for p in extra:
        argv += ["--gin-param", p]
    code, out, err = check_config(capsys, task, preset, *argv)
    assert code == 2 and "configuration OK" not in out
    line = err.strip().splitlines()[-1]
    assert "NetworkArgs.rab_query_time:" in line and why in line, line
    assert line.startswith("error: --gin-param 'NetworkArgs.rab_query_time=True': "), line


@pytest.mark.parametrize("task, preset, extra, lacking", [
    ("ranking", "debug_ranking.gin", ["DatasetArgs.contextual_features=[]"], "candidates"),
    ("retrieval", "debug_retrieval.gin", [], "contextual tokens"),
    ("retrieval", "debug_retrieval.gin",
     ["DatasetArgs.contextual_features=[]", "NetworkArgs.min_full_attn_seq_len=4"],
     "min_full_attn_seq_len=4"),
])
def test_a_window_the_cutlass_kernel_cannot_express_is_refused_at_start(
    capsys, task, preset, extra, lacking
) -> None:
    argv = ["--gin-param", 'NetworkArgs.kernel_backend="cutlass"',
            "--gin-param", "NetworkArgs.max_attn_len=8"]
    for p in extra:
        argv += ["--gin-param", p]
    code, out, err = check_config(capsys, task, preset, *argv)
    assert code == 2 and "configuration OK" not in out, err
    line = err.strip().splitlines()[-1]
    assert "NetworkArgs.max_attn_len" in line and f"max_attn_len=8 with {lacking}" in line, line
    assert "use kernel backend" in line, line


def test_a_plain_window_on_cutlass_passes_the_configcheck_config(capsys) -> None:
    code, out, err = check_config(capsys, "retrieval", "debug_retrieval.gin",
                            "--gin-param", 'NetworkArgs.kernel_backend="cutlass"',
                            "--gin-param", "NetworkArgs.max_attn_len=8",
                            "--gin-param", "DatasetArgs.contextual_features=[]")
    assert code == 0 and "configuration OK" in out, err
