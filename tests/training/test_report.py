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


def test_the_per_item_baseline_is_its_own_line_and_beside_the_auc() -> None:
    baseline = {"loss": 1.95, "AUC": 0.5, "per_item/loss": 1.90, "per_item/AUC": 0.66}
    lines = _summary("ranking", {"loss": 1.80, "AUC": 0.64}, baseline)
    assert "  baseline (label prior): loss 1.9500 AUC 0.5000" in lines
    assert "  baseline (per-item rate): loss 1.9000 AUC 0.6600" in lines
    # the model is below the per-item floor here: said so, with the difference
    assert "  AUC vs per-item: 0.6400 vs 0.6600 (-0.0200, not above)" in lines
    # the prior comparison still uses the prior's loss, not the per-item one
    assert "  loss vs prior:  1.8000 vs 1.9500 (7.7% better)" in lines


def test_the_report_draws_the_per_item_auc_as_the_auc_baseline(tmp_path) -> None:
    from hstu.training.report import write_report

    (tmp_path / "metrics.csv").write_text(
        "step,split,name,value\n10,train,loss,2.0\n10,eval,loss,1.9\n10,eval,AUC,0.61\n"
        "10,baseline,loss,1.95\n10,baseline,AUC,0.5\n10,baseline,per_item/loss,1.9\n"
        "10,baseline,per_item/AUC,0.66\n"
    )
    page = (tmp_path / write_report(str(tmp_path))).read_text()
    # the table's baseline column: the per-item AUC (not the prior's 0.5), the prior's loss
    assert "<td>AUC</td><td>0.6100</td><td></td><td>0.6600</td>" in page
    assert "<td>loss</td><td>1.9000</td><td></td><td>1.9500</td>" in page
