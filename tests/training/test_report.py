"""The end-of-run summary: the ranking loss is compared with the label prior's."""

from __future__ import annotations

from hstu.training.report import summary_lines


def _summary(task: str, final: dict, baseline: dict) -> list[str]:
    return summary_lines(task, "/runs/x", final, baseline, ("AUC", 40, 0.71), None, "")


def test_a_loss_worse_than_the_label_prior_is_warned_about() -> None:
    lines = _summary("ranking", {"loss": 2.06, "AUC": 0.72}, {"loss": 1.95, "AUC": 0.5})
    assert "  loss vs prior:  2.0600 vs 1.9500 (5.6% worse)" in lines
    warnings = [ln for ln in lines if ln.startswith("[hstu] warning:")]
    assert len(warnings) == 1 and "2.0600 is worse than the label prior's 1.9500" in warnings[0]


def test_a_loss_better_than_the_prior_gives_no_warning() -> None:
    lines = _summary("ranking", {"loss": 1.80, "AUC": 0.72}, {"loss": 1.95, "AUC": 0.5})
    assert "  loss vs prior:  1.8000 vs 1.9500 (7.7% better)" in lines
    assert not any("warning" in ln for ln in lines)


def test_retrieval_has_no_prior_line() -> None:
    lines = _summary("retrieval", {"HR@10": 0.2}, {"HR@10": 0.07})
    assert not any("prior" in ln for ln in lines)
