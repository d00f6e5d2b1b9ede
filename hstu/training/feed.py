"""The training batches a pipeline reads: built on a background thread, prepared (dynamic
tables' input stage) on the training thread, with their cost counted for the logs.

- A daemon thread runs the loader (numpy gathers, negatives, KeyedJaggedTensor assembly;
  on a GPU host also ``pin_memory`` so the pipeline's host-to-device copy is asynchronous)
  up to ``depth`` batches ahead of the training thread. On CPU it runs at nice 19
  (:func:`hstu.training.cpu_placement.lower_this_thread`): it fills the training thread's
  waits instead of preempting it. Batches come out in the loader's
  order; an exception in the thread is raised on the training thread.
- ``prepare`` (the model's input stage, e.g. the dynamic tables' remapping, a collective)
  runs on the training thread when the pipeline asks for the batch, so every rank calls it
  in the same order.
- Pipelines read up to two batches ahead of the step they run, so the per-batch figures
  (tokens, FLOPs) are queued when a batch is read and popped when its step completes.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from hstu.training.cpu_placement import lower_this_thread
from hstu.training.flops import step_flops


class BatchCost(NamedTuple):
    """What one training batch holds: tokens (with contextual and action tokens), the HSTU
    FLOPs of its step, and samples."""

    tokens: int = 0
    flops: float = 0.0
    samples: int = 0


class Feed:
    """Endless batches over epochs (see the module docstring)."""

    def __init__(
        self,
        loader: Any,
        network: Any,
        prepare: Callable[[Any], Any] | None = None,
        device: torch.device | None = None,
        depth: int = 4,
    ) -> None:
        self.loader = loader
        self.network = network
        self.prepare = prepare
        self.pin = device is not None and device.type == "cuda"
        self.depth = depth
        self.costs: deque[BatchCost] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.native_id: int | None = None

    # ------------------------------------------------------------------ producer
    def _produce(self, out: queue.Queue) -> None:
        self.native_id = threading.get_native_id()
        try:
            if not self.pin:  # a CPU run: the thread yields its cores to the training thread
                lower_this_thread()
            while not self._stop.is_set():
                empty = True
                for batch in self.loader:
                    empty = False
                    if self.pin:
                        batch = batch.pin_memory()
                    item = (batch, self._cost(batch))
                    while not self._stop.is_set():
                        try:
                            out.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
                if empty:
                    raise RuntimeError("the training loader yielded no batch in a whole epoch")
        except BaseException as exc:  # noqa: BLE001 - carried to the training thread, raised there
            out.put(exc)

    def __iter__(self) -> Iterator[Any]:
        out: queue.Queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(
            target=self._produce, args=(out,), name="hstu-batches", daemon=True
        )
        self._thread.start()
        while True:
            item = out.get()  # (batch, its cost), or the thread's exception
            if isinstance(item, BaseException):
                raise item
            batch, cost = item
            self.costs.append(cost)
            yield self.prepare(batch) if self.prepare is not None else batch

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ---------------------------------------------------------------------- cost
    def _cost(self, batch: Any) -> BatchCost:
        seqlens = batch.item_lengths().clone()
        samples = int(seqlens.numel())
        seqlens += len(batch.contextual_feature_names)
        if batch.action_feature_name is not None:
            seqlens += batch.features[batch.action_feature_name].lengths()
        flops = step_flops(seqlens, self.network)
        return BatchCost(int(seqlens.sum()), flops, samples)

    def pop_cost(self) -> BatchCost:
        """The cost of the oldest batch whose step has not been counted yet."""
        return self.costs.popleft() if self.costs else BatchCost()


__all__ = ["BatchCost", "Feed"]
