"""Train pipelines: none (sequential), native (TorchRec TrainPipelineSparseDist) and prefetch
(TorchRec PrefetchTrainPipelineSparseDist). All run zero_grad -> forward -> backward -> step
on the same batches in the same order, so they give the same losses for a seed; they differ
only in what overlaps (host-to-device copy and embedding input distribution of the next
batches, and for prefetch the embedding-cache prefetch).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch


class SequentialPipeline:
    """pipeline_type="none": one batch at a time, nothing overlapped.

    ``progress`` returns ``(detached loss, model outputs)`` like the TorchRec pipelines here.
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any, device: torch.device) -> None:
        self._model = model
        self._optimizer = optimizer
        self._device = device

    def progress(self, dataloader_iter: Iterator[Any]) -> Any:
        batch = next(dataloader_iter)  # StopIteration ends the epoch, as in TorchRec pipelines
        batch = batch.to(self._device, non_blocking=True)
        self._optimizer.zero_grad()
        loss, output = self._model(batch)
        _scaled(self._optimizer, torch.sum(loss)).backward()
        self._optimizer.step()
        return loss.detach(), output

    def detach(self) -> torch.nn.Module:
        return self._model

    def attach(self, model: torch.nn.Module | None = None) -> None:
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

    caching = {EmbeddingComputeKernel.FUSED_UVM_CACHING.value, EmbeddingComputeKernel.KEY_VALUE.value}
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
    from torchrec.distributed.train_pipeline import (
        PrefetchTrainPipelineSparseDist,
        TrainPipelineSparseDist,
    )

    if pipeline_type == "prefetch":
        ok, why = _prefetch_supported(model)
        if ok:
            return _untraceable_tolerant(PrefetchTrainPipelineSparseDist, log)(
                model, optimizer, device, execute_all_batches=True,
                custom_model_fwd=_with_loss(model, optimizer),
            )
        log(f"[hstu] pipeline_type=prefetch not applicable ({why}); running native instead")
    return _untraceable_tolerant(TrainPipelineSparseDist, log)(
        model, optimizer, device, execute_all_batches=True, custom_model_fwd=_with_loss(model, optimizer)
    )


def _with_loss(model: torch.nn.Module, optimizer: Any) -> Any:
    """TorchRec pipelines return only the model's second output; put the loss in it so that
    every pipeline's ``progress`` returns ``(detached loss, model outputs)``. The first output
    is what backward runs on (times the float16 loss scale)."""

    def forward(batch: Any) -> tuple[torch.Tensor, Any]:
        loss, output = model(batch)
        return _scaled(optimizer, loss), (loss.detach(), output)

    return forward


def _untraceable_tolerant(base: type, log: Any) -> type:
    """``base`` whose model rewrite tolerates a model that torch.fx cannot trace.

    TorchRec finds the sharded embedding calls by fx-tracing the model's forward; a forward
    with data-dependent Python (jagged lengths, dynamic-table remapping) cannot be traced.
    Then the embedding input distribution runs inside forward as usual (results unchanged)
    and only the batch copy ahead of time is overlapped; one line says so.
    """

    class Pipeline(base):  # type: ignore[misc, valid-type]
        def _pipeline_model(self, batch: Any, context: Any, *args: Any, **kwargs: Any) -> None:
            from torch.fx.proxy import TraceError

            try:
                super()._pipeline_model(batch, context, *args, **kwargs)
            except (TraceError, TypeError, NotImplementedError) as exc:
                if not getattr(self, "_hstu_warned", False):
                    reason = str(exc).split("\n")[0][:120]
                    log(
                        f"[hstu] {base.__name__}: embedding input-dist not overlapped (model not "
                        f"fx-traceable: {reason}); batches are still prefetched"
                    )
                    self._hstu_warned = True
                self._pipelined_modules = []
                self._original_forwards = []
                self._pipelined_postprocs = []
                self._original_kjt_dist_forwards = []

    Pipeline.__name__ = Pipeline.__qualname__ = f"Tolerant{base.__name__}"
    return Pipeline
