"""Command line of the two entry points (pretrain_gr_ranking.py, pretrain_gr_retrieval.py)."""

from __future__ import annotations

import argparse
import os
import sys

from hstu.args import ConfigError
from hstu.config import RunConfig, Task, check_run, load_config
from hstu.console import fail, quiet_start
from hstu.data.errors import DataError
from hstu.data.sizes import describe_sizes, resolve_sizes
from hstu.training.host_settings import HostSettings


def parse_args(task: Task, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"pretrain_gr_{task}.py",
        description=f"Train an HSTU {task} model configured by a gin file.",
    )
    parser.add_argument("--gin-config-file", required=True, help="path of the .gin preset")
    parser.add_argument(
        "--gin-param",
        action="append",
        default=[],
        metavar="BINDING",
        help="extra gin binding applied after the file, e.g. 'TrainerArgs.seed=7' (repeatable)",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print it and exit without training",
    )
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="score the checkpoint of TrainerArgs.ckpt_load_dir on the evaluation (and test) "
        "split with this configuration's evaluation settings, then exit: nothing is trained "
        "or saved (docs/training.md \"Evaluating a checkpoint\")",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        metavar="N",
        help="with --check-config: the number of processes the run will have (torchrun's "
        "--nnodes x --nproc_per_node); default: WORLD_SIZE under torchrun, else 1 (a plain "
        "python run is a world of 1)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="with --check-config: the device the run will use; default: this host's (cuda "
        "when torch sees a GPU, else cpu), which a run always uses",
    )
    ns = parser.parse_args(argv)
    if ns.world_size is not None and ns.world_size < 1:
        parser.error(f"--world-size must be >= 1, got {ns.world_size}")
    if ns.device is not None and not ns.check_config:
        parser.error("--device is for --check-config (a run uses this host's device)")
    return ns


def device_of(ns: argparse.Namespace) -> str:
    """The device type the configuration is checked against: ``--device``, else what
    :func:`hstu.training.distributed.init_distributed` will pick (CUDA when available)."""
    if ns.device is not None:
        return ns.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def world_size_of(ns: argparse.Namespace) -> tuple[int, str]:
    """(world size the configuration is checked against, where that number comes from)."""
    if "WORLD_SIZE" in os.environ:  # under torchrun: the real world
        world = int(os.environ["WORLD_SIZE"])
        if ns.world_size is not None and ns.world_size != world:
            raise ConfigError(
                "--world-size", None,
                f"{ns.world_size} disagrees with torchrun's WORLD_SIZE={world}",
            )
        return world, "torchrun's WORLD_SIZE"
    if ns.world_size is not None:
        return ns.world_size, "--world-size"
    return 1, "a plain python run; pass --world-size N to check a run of N processes"


def describe(cfg: RunConfig) -> str:
    """A readable dump of the validated arguments."""
    parts = [f"task: {cfg.task}", f"sources: {', '.join(cfg.sources)}"]
    for name in ("trainer", "network", "optimizer", "tp", "dataset", "ranking", "retrieval"):
        if getattr(cfg, name) is not None:
            parts.append(f"{name}: {getattr(cfg, name)}")
    parts += [f"table: {table}" for table in cfg.tables]
    parts += [f"{name}: {value}" for name, value in cfg.extras.items()]
    return "\n".join(parts)


def main(task: Task, argv: list[str] | None = None) -> int:
    ns = parse_args(task, argv)
    quiet_start()  # before megatron/torchrec are imported: their known warnings go to the run log
    rank = int(os.environ.get("RANK", "0"))
    try:
        # everything the run checks before its first step, --check-config checks too
        world_size, source = world_size_of(ns)
        HostSettings.from_env()  # the HSTU_* variables the run applies (one line if malformed)
        try:
            cfg = load_config(ns.gin_config_file, ns.gin_param, task=task, world_size=world_size)
        except ConfigError as exc:
            if exc.field_name == "tensor_model_parallel_size" and "world size" in exc.message:
                exc = ConfigError(exc.cls_name, exc.field_name,
                                  f"{exc.message} ({source})").with_location(exc.location)
            raise exc from None
        if rank == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            for line in cfg.warnings:
                print(f"warning: {line}", file=sys.stderr, flush=True)
        # "auto" sizes from the preprocessed data's metadata, and too-small fixed sizes
        # refused, before any process group or model exists
        cfg = resolve_sizes(cfg)
        # the tables on this device and world: what the builder would refuse, refused now
        check_run(cfg, device_of(ns), world_size)
    except (ConfigError, DataError) as exc:
        return fail(str(exc))
    if ns.check_config:
        if rank == 0:
            print(describe(cfg))
            sizes = describe_sizes(cfg)
            if sizes:
                print(sizes)
            for line in cfg.choices:
                print(line)
            print("configuration OK")
        return 0
    from hstu.training.run import run  # heavy imports only after the config is valid

    if argv is None:  # the command line of this process: its budget counts from its start
        import hstu

        cfg.started = hstu.STARTED
    return run(cfg, evaluate_only=ns.evaluate)
