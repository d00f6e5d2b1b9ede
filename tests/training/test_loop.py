"""The training loop's small collaborators: the metrics window's logged mean."""

from __future__ import annotations

import pytest
import torch

from hstu.training.loop import MetricsWindow


class _Optimizer:
    lr = 1e-3
    last_grad_norm = None
    scaler = None



def test_a_flush_between_log_lines_stays_in_the_window_mean(one_process_group) -> None:
    """A new best on a step between two log lines flushes the pending losses before its
    checkpoint; the next log line's mean still covers every step of its window."""
    window = MetricsWindow(peak_flops=0.0, world_size=1)
    for step, loss in enumerate([1.0, 2.0, 3.0, 4.0, 5.0], start=1):
        window.record(torch.tensor(loss), None, tokens=10, flops=0.0)
        if step == 3:  # the evaluation at step 3 found a new best
            window.flush(step)
    window.flush(5)
    metrics = window.summarize(_Optimizer())
    assert metrics["loss"] == pytest.approx(3.0)
    assert window.losses == [1.0, 2.0, 3.0, 4.0, 5.0]
    # the next window starts empty
    window.record(torch.tensor(7.0), None, tokens=10, flops=0.0)
    window.flush(6)
    assert window.summarize(_Optimizer())["loss"] == pytest.approx(7.0)


def test_a_non_finite_loss_stops_naming_its_step(one_process_group) -> None:
    window = MetricsWindow(peak_flops=0.0, world_size=1)
    window.record(torch.tensor(1.0), None, tokens=1, flops=0.0)
    window.record(torch.tensor(float("nan")), None, tokens=1, flops=0.0)
    with pytest.raises(FloatingPointError, match="step 8: loss is nan"):
        window.flush(8)


def test_the_eta_is_the_measured_time_per_step_times_the_steps_left(monkeypatch) -> None:
    from hstu.training import loop

    clock = iter([100.0, 130.0, 190.0])  # start; after 10 steps (30 s); after 20 (90 s)
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    eta = loop.Eta(first_step=40)  # resumed at step 40: counts from there
    assert eta.seconds(40, 200) is None
    assert eta.seconds(50, 200) == pytest.approx(30 / 10 * 150)
    assert eta.seconds(60, 200) == pytest.approx(90 / 20 * 140)
    metrics = {"loss": 1.0, "lr": 1e-3, "tokens_per_s": 1000.0, "tflops": 0.0, "mfu": 0.0}
    assert loop.train_line(60, 200, metrics, 630.0).endswith(" MFU 0.00% eta 10 min 30 s")
    assert loop.train_line(200, 200, metrics, 0.0).endswith("MFU 0.00%")  # the last step: none
    assert [loop.format_eta(s) for s in (44.6, 60, 3725)] == ["45 s", "1 min 00 s", "1 h 02 min"]
