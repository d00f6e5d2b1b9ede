"""The collectives of a run on a GPU host, checked on this CPU host.

On a GPU host the default process group is made with :func:`process_group_backend` of a
CUDA device, and every group made later inherits its device-type map. A host tensor handed
to a group whose map has no backend for "cpu" (NCCL alone) fails: "No backend type
associated with device type cpu". Here each group is made with the same device-type map but
gloo everywhere (:func:`tests.dist_utils.gloo_with_device_map`): ``"nccl"`` becomes
``"cuda:gloo"``, which refuses host tensors exactly as NCCL does. Then trainer-level runs
(log steps, evaluation with best-checkpoint tracking, checkpoints, resume, the test split,
the baselines; DP=2 ranking and TP=2 retrieval) must complete: every host-side agreement
finds a backend for its tensors, as it will on the GPU host.

The map is what the code chooses for a GPU; on the code before this test existed ("nccl")
every run here failed at its first log step (trainer.py's window all-reduce).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from hstu.training.distributed import process_group_backend
from tests.dist_utils import gloo_with_device_map, run_multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU_HOST = process_group_backend(torch.device("cuda", 0))


def test_emulated_map_refuses_host_tensors_like_nccl() -> None:
    assert gloo_with_device_map("nccl") == "cuda:gloo"
    assert gloo_with_device_map("cpu:gloo,cuda:nccl") == "cpu:gloo,cuda:gloo"
    # the emulation is only worth something if it fails where NCCL alone would
    with pytest.raises(AssertionError, match="No backend type associated with device type cpu"):
        run_multiprocess(_host_all_reduce, world_size=2, backend=gloo_with_device_map("nccl"))


def _host_all_reduce(rank: int, world_size: int) -> None:
    dist.all_reduce(torch.ones(1))


def test_gpu_host_backend_serves_host_and_device_tensors() -> None:
    served = {part.split(":")[0] for part in GPU_HOST.split(",") if ":" in part}
    assert served == {"cpu", "cuda"}, GPU_HOST
    assert process_group_backend(torch.device("cpu")) == "gloo"


def _run(rank: int, world_size: int, tmp: str, task: str, tp: int, metric: str) -> None:
    import gin

    from hstu.config import load_config
    from hstu.training.distributed import init_distributed, set_seed
    from hstu.training.trainer import Trainer

    assert dist.get_backend() == gloo_with_device_map(GPU_HOST)
    results = {}
    for phase, steps, load in (("first", 4, ""), ("resumed", 6, "auto")):
        gin.clear_config()
        cfg = load_config(
            os.path.join(ROOT, "configs", f"debug_{task}.gin"),
            [
                f'DatasetArgs.dataset_path="{os.path.join(tmp, "data", "synthetic")}"',
                f'TrainerArgs.ckpt_save_dir="{os.path.join(tmp, "ckpt")}"',
                f'TrainerArgs.ckpt_load_dir="{load}"',
                f"TrainerArgs.max_train_iters={steps}", "TrainerArgs.log_interval=1",
                "TrainerArgs.eval_interval=2", "TrainerArgs.max_eval_iters=2",
                "TrainerArgs.ckpt_save_interval=2", f'TrainerArgs.best_metric="{metric}"',
                "TrainerArgs.early_stopping_patience=10", "DatasetArgs.holdout_validation=True",
                f"TensorModelParallelArgs.tensor_model_parallel_size={tp}",
            ],
            task=task,
            world_size=world_size,
        )
        env = init_distributed(tp)
        set_seed(cfg.trainer.seed)
        trainer = Trainer(cfg, env, os.path.join(tmp, phase), "")
        try:
            final = trainer.train()
            results[phase] = {"step": trainer.step, "losses": trainer.losses, "final": final}
        finally:
            trainer.close()
    if rank == 0:
        with open(os.path.join(tmp, "result.json"), "w") as fh:
            json.dump(results, fh)


@pytest.mark.parametrize("task, tp, metric", [("ranking", 1, "AUC"), ("retrieval", 2, "HR@10")])
def test_trainer_runs_with_the_gpu_hosts_group_backends(tmp_path, task, tp, metric) -> None:
    tmp = str(tmp_path)
    run_multiprocess(_run, world_size=2, backend=gloo_with_device_map(GPU_HOST),
                     tmp=tmp, task=task, tp=tp, metric=metric)
    with open(os.path.join(tmp, "result.json")) as fh:
        results = json.load(fh)
    assert results["first"]["step"] == 4 and results["resumed"]["step"] == 6
    assert len(results["first"]["losses"]) == 4 and len(results["resumed"]["losses"]) == 2
    for phase in ("first", "resumed"):
        assert metric in results[phase]["final"], results[phase]["final"]
