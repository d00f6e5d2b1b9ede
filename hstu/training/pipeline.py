"""Train pipelines: none (sequential), native (TorchRec TrainPipelineSparseDist) and prefetch
(TorchRec PrefetchTrainPipelineSparseDist). All run zero_grad -> forward -> backward -> step
on the same batches in the same order, so they give the same losses for a seed; they differ
only in what overlaps (host-to-device copy and embedding input distribution of the next
batches, and for prefetch the embedding-cache prefetch).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

# profiler labels of a sequential step (the benchmark splits a step's time by them)
STEP_LABEL = "hstu::"


class SequentialPipeline:
    """pipeline_type="none": one batch at a time, nothing overlapped.

    ``progress`` returns ``(detached loss, model outputs)`` like the TorchRec pipelines here;
    its phases are labelled ``hstu::data``, ``hstu::backward`` and ``hstu::optimizer`` for
    the profiler.
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any, device: torch.device) -> None:
        self._model = model
        self._optimizer = optimizer
        self._device = device

    def progress(self, dataloader_iter: Iterator[Any]) -> Any:
        label = torch.autograd.profiler.record_function
        with label(STEP_LABEL + "data"):
            # StopIteration ends the epoch, as in TorchRec pipelines
            batch = next(dataloader_iter)
            batch = batch.to(self._device, non_blocking=True)
        self._optimizer.zero_grad()
        loss, output = self._model(batch)
        with label(STEP_LABEL + "backward"):
            _scaled(self._optimizer, torch.sum(loss)).backward()
        with label(STEP_LABEL + "optimizer"):
            self._optimizer.step()
        return loss.detach(), output

    def detach(self) -> torch.nn.Module:
        return self._model

    def attach(self, model: torch.nn.Module | None = None, sparse_dist: bool = False) -> None:
        if model is not None:
            self._model = model


def _scaled(optimizer: Any, loss: torch.Tensor) -> torch.Tensor:
    scale = getattr(optimizer, "scale_loss", None)
    return loss if scale is None else scale(loss)


def sharding_kernels(model: torch.nn.Module) -> dict[str, str]:
    """table -> compute kernel, from the sharding plan of every sharded collection in ``model``
    (the plans live on the DistributedModelParallel of each HstuEmbeddings, ``.ec.plan``)."""
    from hstu.embeddings.sharding import _find_embedding_modules

    kernels: dict[str, str] = {}
    for emb in _find_embedding_modules(model):
        plan = getattr(emb.ec, "plan", None)
        if plan is None:
            continue
        for module_plan in plan.plan.values():
            for table, param_sharding in module_plan.items():
                kernels[table] = param_sharding.compute_kernel
    return kernels


def _prefetch_supported(model: torch.nn.Module, cuda: bool | None = None) -> tuple[bool, str]:
    """Prefetch needs a GPU and a table whose kernel has a cache to prefetch into."""
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel

    kernel = EmbeddingComputeKernel
    caching = {kernel.FUSED_UVM_CACHING.value, kernel.KEY_VALUE.value}
    kernels = sharding_kernels(model)
    cached = sorted(t for t, k in kernels.items() if k in caching)
    if not cached:
        return False, (
            f"no table uses a caching kernel (kernels: {kernels or 'none'}; "
            "DynamicEmbeddingArgs.caching=True on a GPU)"
        )
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return False, f"no GPU: tables {cached} need the UVM caching kernel"
    return True, ""


def build_pipeline(
    pipeline_type: str,
    model: torch.nn.Module,
    optimizer: Any,
    device: torch.device,
    log: Any = print,
) -> Any:
    """The pipeline for ``pipeline_type``; prefetch falls back to native (one line says why)."""
    if pipeline_type == "none":
        return SequentialPipeline(model, optimizer, device)
    from torchrec.distributed.types import ShardedModule

    if not any(isinstance(m, ShardedModule) for m in model.modules()):
        # every table replicated (data_parallel): no input distribution to run ahead
        log(
            f"[hstu] pipeline_type={pipeline_type} not applicable (no sharded embedding "
            "collection: every table is data_parallel); running none"
        )
        return SequentialPipeline(model, optimizer, device)
    from torchrec.distributed.train_pipeline import (
        PrefetchTrainPipelineSparseDist,
        TrainPipelineSparseDist,
    )

    base: type = TrainPipelineSparseDist
    if pipeline_type == "prefetch":
        ok, why = _prefetch_supported(model)
        if ok:
            base = PrefetchTrainPipelineSparseDist
        else:
            log(f"[hstu] pipeline_type=prefetch not applicable ({why}); running native instead")
    return _reporting(base, log)(
        model, optimizer, device, execute_all_batches=True,
        custom_model_fwd=_with_loss(model, optimizer),
    )


def _with_loss(model: torch.nn.Module, optimizer: Any) -> Any:
    """TorchRec pipelines return only the model's second output; put the loss in it so that
    every pipeline's ``progress`` returns ``(detached loss, model outputs)``. The first output
    is what backward runs on (times the float16 loss scale)."""

    def forward(batch: Any) -> tuple[torch.Tensor, Any]:
        loss, output = model(batch)
        return _scaled(optimizer, loss), (loss.detach(), output)

    return forward


def pipelined_module_names(pipeline: Any) -> list[str]:
    """Fully qualified names of the sharded modules whose input distribution the pipeline
    runs ahead (empty for ``none``, or when nothing could be pipelined)."""
    modules = getattr(pipeline, "_pipelined_modules", None) or []
    model = getattr(pipeline, "_model", None)
    names = {id(m): n for n, m in model.named_modules()} if model is not None else {}
    return [names.get(id(m), type(m).__name__) for m in modules]


def _reporting(base: type, log: Any) -> type:
    """``base`` that says once what it pipelines, and names the module and the reason when a
    sharded module cannot be pipelined (its input distribution then runs inside forward:
    results are unchanged, only less overlaps)."""

    class Pipeline(base):  # type: ignore[misc, valid-type]
        def _pipeline_model(self, batch: Any, context: Any, *args: Any, **kwargs: Any) -> None:
            super()._pipeline_model(batch, context, *args, **kwargs)
            if getattr(self, "_hstu_reported", False):
                return
            self._hstu_reported = True
            from torchrec.distributed.types import ShardedModule

            pipelined = pipelined_module_names(self)
            sharded = [n for n, m in self._model.named_modules() if isinstance(m, ShardedModule)]
            missing = [n for n in sharded if n not in pipelined]
            if missing:
                log(
                    f"[hstu] {base.__name__}: input-dist of {', '.join(missing)} not overlapped "
                    "(not called straight on the batch's features in the model's top-level "
                    "forward); it runs inside forward"
                )
            else:
                log(
                    f"[hstu] {base.__name__}: input-dist of {', '.join(pipelined)} overlapped "
                    "with the previous step"
                )

    Pipeline.__name__ = Pipeline.__qualname__ = f"Reporting{base.__name__}"
    return Pipeline
