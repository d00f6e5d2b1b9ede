"""What a finished run tells its user: a summary on the console and ``report.html`` with the
loss and metric curves against the baseline, in the run directory (rank 0).

The report is drawn from ``metrics.csv`` alone (``step,split,name,value``; the baseline rows
have split ``baseline``), so :func:`write_report` also redraws the report of any run
directory: ``python -m hstu.training.report runs/<run>``.
"""

from __future__ import annotations

import csv
import html
import math
import os
import re
import sys
from collections import defaultdict

REPORT_FILE = "report.html"
PER_ITEM = "per_item/"
"""Prefix of the ranking's per-item baseline in the ``baseline`` rows (``per_item/AUC``):
each candidate scored with its item's training label rate (hstu.training.evaluate)."""


def read_metrics(run_dir: str) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(split, name) -> [(step, value)] in file order (a resumed run appends)."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as fh:
        for row in csv.DictReader(fh):
            series[(row["split"], row["name"])].append((int(row["step"]), float(row["value"])))
    return dict(series)


STREAM_METRIC = re.compile(r"^(HR@\d+|NDCG@\d+|MRR|AUC|NE|loss)$")
"""The ``stream`` rows drawn as curves (online training's per-window test)."""
SERVED_PREFIX = "served_"
"""The served version's ``stream`` rows: ``served_<metric>`` beside each ``<metric>`` of a
window, and ``served_step`` (hstu.training.served)."""


def stream_windows(run_dir: str) -> list[dict[str, float]]:
    """The ``stream`` rows of an online run (hstu.training.online), one dict per window in
    window order (the rows of a window are consecutive and start with ``window``; a resume
    drops rows after its checkpoint, so each window is there once)."""
    out: list[dict[str, float]] = []
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as fh:
        for row in csv.DictReader(fh):
            if row["split"] != "stream":
                continue
            if row["name"] == "window" or not out:
                out.append({})
            out[-1][row["name"]] = float(row["value"])
    return sorted(out, key=lambda g: g.get("window", 0.0))


def prequential(windows: list[dict[str, float]], metric: str,
                 fading: float = 1.0) -> list[tuple[int, float]]:
    """[(window, prequential mean of ``metric``)]: each window's value weighted by its
    ``eval_events``, over the windows so far (the prequential curve). ``fading`` < 1 is the
    fading factor per event (Gama et al.): a window's weight is multiplied by
    ``fading ** n`` for each later window of n events, so the mean follows the recent
    windows (about ``1 / (1 - fading)`` events); 1 is the cumulative mean."""
    out, total, weight = [], 0.0, 0.0
    for w in windows:
        n = w.get("eval_events", 0.0)
        if metric in w and n > 0 and math.isfinite(w[metric]):
            decay = fading ** n
            total = total * decay + w[metric] * n
            weight = weight * decay + n
            out.append((int(w["window"]), total / weight))
    return out


def _plot(run_dir: str, key: str, title: str, lines: list[tuple[str, list[tuple[int, float]]]],
          baseline: float | None, ylabel: str, xlabel: str = "step") -> str:
    """Draws ``curve_<key>.png`` into ``run_dir``; returns its file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for label, points in lines:
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", label=f"baseline {baseline:.4f}")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    name = "curve_" + re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_") + ".png"
    fig.savefig(os.path.join(run_dir, name))
    plt.close(fig)
    return name


def write_report(run_dir: str, summary: list[str] | None = None) -> str:
    """Draws one PNG per curve (training loss; each evaluation metric) with the baseline as a
    dashed line, and report.html showing them under the summary. Returns the report's path."""
    series = read_metrics(run_dir)
    baseline = {name: pts[-1][1] for (split, name), pts in series.items() if split == "baseline"}
    # the line under a ranking metric: the per-item baseline's (the label prior's AUC is 0.5
    # by construction); the loss keeps the prior's, the one the selection rule uses
    for name in [n for n in baseline if n.startswith(PER_ITEM)]:
        if name != PER_ITEM + "loss":
            baseline[name.removeprefix(PER_ITEM)] = baseline[name]
    figures: list[tuple[str, str]] = []
    loss_lines = [("train", series[("train", "loss")])] if ("train", "loss") in series else []
    if ("eval", "loss") in series:
        loss_lines.append(("eval", series[("eval", "loss")]))
    if loss_lines:
        name = _plot(run_dir, "loss", "loss", loss_lines, baseline.get("loss"), "loss")
        caption = "Loss (train: mean over each log window; eval: the evaluation split)"
        figures.append((name, caption))
    for (split, metric), points in sorted(series.items()):
        if split != "eval" or metric == "loss" or metric == "best_step" or "/" in metric:
            continue
        name = _plot(run_dir, metric, metric, [("eval", points)], baseline.get(metric), metric)
        figures.append((name, f"{metric} at each evaluation"))
    windows = stream_windows(run_dir) if any(s == "stream" for s, _ in series) else []
    for metric in sorted({k for w in windows for k in w if STREAM_METRIC.match(k)}):
        per_window = [(int(w["window"]), w[metric]) for w in windows
                      if metric in w and math.isfinite(w[metric])]
        name = _plot(run_dir, f"stream {metric}", f"{metric} on the stream",
                     [("each window (before training on it)", per_window),
                      ("running mean over the events so far", prequential(windows, metric))],
                     None, metric, xlabel="window")
        caption = (f"{metric}: each window tested before training on it, and the prequential "
                   "mean (windows weighted by their events)")
        figures.append((name, caption))
    tests = {name: pts[-1][1] for (split, name), pts in series.items()
             if split == "eval" and name.startswith("test/")}
    rows = []
    metrics = {n for (s, n) in series if s == "eval" and "/" not in n and n != "best_step"}
    for metric in sorted(metrics):
        final = series[("eval", metric)][-1][1]
        test = tests.get(f"test/{metric}")
        base = baseline.get(metric)
        rows.append(
            f"<tr><td>{html.escape(metric)}</td><td>{final:.4f}</td>"
            f"<td>{'' if test is None else f'{test:.4f}'}</td>"
            f"<td>{'' if base is None else f'{base:.4f}'}</td></tr>"
        )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>hstu run report</title>",
        ("<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
         "td,th{padding:0 1em;text-align:right}pre{background:#f4f4f4;padding:1em}</style>"),
        "</head><body>",
        f"<h1>Run {html.escape(os.path.basename(os.path.normpath(run_dir)))}</h1>",
    ]
    if summary:
        parts.append("<pre>" + html.escape("\n".join(summary)) + "</pre>")
    if rows:
        parts.append("<table><tr><th>metric</th><th>last evaluation</th><th>test (best)</th>"
                     "<th>baseline</th></tr>" + "".join(rows) + "</table>")
    for name, caption in figures:
        parts.append(f"<figure><img src='{name}' alt='{html.escape(caption)}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append(
        "<p>Data: metrics.csv (step,split,name,value) in this directory.</p></body></html>"
    )
    path = os.path.join(run_dir, REPORT_FILE)
    with open(path, "w") as fh:
        fh.write("\n".join(parts) + "\n")
    return path


def _loss_against_prior(
    task: str, final: dict[str, float], baseline: dict[str, float]
) -> list[str]:
    """Ranking: the model's evaluation loss against the label prior's (a constant score per
    class); when it is worse, one warning: a better AUC with a worse loss means the
    probabilities are worse than a constant (overconfident), even if the ranking is better."""
    if task != "ranking" or "loss" not in final or "loss" not in baseline:
        return []
    model, prior = final["loss"], baseline["loss"]
    change = (model - prior) / prior if prior > 0 else 0.0
    side = "worse" if model > prior else "better"
    lines = [f"  loss vs prior:  {model:.4f} vs {prior:.4f} ({abs(change):.1%} {side})"]
    if model > prior:
        lines.append(
            f"[hstu] warning: the evaluated checkpoint's loss {model:.4f} is worse than the label "
            f"prior's {prior:.4f}: its probabilities are worse than a constant score although "
            "its AUC may be better (overconfident); use its scores to rank, not as "
            "probabilities, or regularise (docs/results.md, ranking)"
        )
    return lines


def _auc_against_per_item(final: dict[str, float], per_item: dict[str, float]) -> list[str]:
    """Ranking: the model's AUC beside the per-item baseline's (what the sequence adds over
    each item's average label)."""
    if "AUC" not in final or "AUC" not in per_item:
        return []
    model, item = final["AUC"], per_item["AUC"]
    side = "above" if model > item else "not above"
    return [f"  AUC vs per-item: {model:.4f} vs {item:.4f} ({model - item:+.4f}, {side})"]


def summary_lines(
    task: str,
    run_dir: str,
    final: dict[str, float],
    baseline: dict[str, float] | None,
    best: tuple[str, int, float] | None,
    checkpoint: str | None,
    resume_hint: str,
    exportable: bool = True,
) -> list[str]:
    """The end-of-run summary: what was reached, against what, where it is, what next
    (``exportable``: whether ``hstu.export`` takes this model)."""
    fmt = " ".join(f"{k} {v:.4f}" for k, v in final.items())
    lines = [f"[hstu] summary of this {task} run"]
    if best is not None:
        metric, step, value = best
        lines.append(
            f"  best step:      {step} (valid {metric} {value:.4f}); test metrics with it: {fmt}"
        )
    else:
        lines.append(f"  last evaluation: {fmt}")
    if baseline:
        name = "popularity" if task == "retrieval" else "label prior"
        own = {k: v for k, v in baseline.items() if not k.startswith(PER_ITEM)}
        per_item = {
            k.removeprefix(PER_ITEM): v for k, v in baseline.items() if k.startswith(PER_ITEM)
        }
        if own:
            values = " ".join(f"{k} {v:.4f}" for k, v in own.items())
            lines.append(f"  baseline ({name}): {values}")
        if per_item:
            lines.append("  baseline (per-item rate): "
                         + " ".join(f"{k} {v:.4f}" for k, v in per_item.items()))
        lines += _loss_against_prior(task, final, own)
        lines += _auc_against_per_item(final, per_item)
    lines.append(f"  run directory:  {run_dir} (metrics.csv, report.html, TensorBoard)")
    if checkpoint is not None:
        lines.append(f"  resume:         {resume_hint}")
        if exportable:
            lines.append(
                f"  export:         python -m hstu.export --ckpt {checkpoint} --out ARTIFACT_DIR "
                "(docs/serving.md)"
            )
    else:
        lines.append(
            "  resume/export:  no checkpoint was saved; set TrainerArgs.ckpt_save_interval"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m hstu.training.report RUN_DIR", file=sys.stderr)
        return 2
    print(write_report(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
