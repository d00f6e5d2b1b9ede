"""The served version's rows of an online run (hstu.training.served, docs/online.md "The
served version's rows"): a replayed stream trained up to window k, published with
``python -m hstu.publish`` (a real export), then resumed: windows up to k have no served rows,
the later ones do, and they equal an evaluation of the published checkpoint on that window
in a fresh process (its weights loaded by the export's loader, not the loop's); they differ
from the trained model's; then a SIGKILL and resume while the served version changes between
the kill and the resume. Both are in the slow tier (runs of the trainer and publishes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training import test_online
from tests.training.test_online import ROOT, _cmd, _env, _params, run, stream_by_window

data = test_online.data  # the replayed dataset (a module fixture)

SERVED = ["TrainerArgs.ckpt_save_interval=1", "StreamArgs.score_served=True"]


def publish(run_dir: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "hstu.publish", "--run", str(run_dir)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return (run_dir / "serving" / "LATEST").read_text().strip()


def probe(data: Path, run_dir: Path, tmp: Path, window: int, served_ckpt: Path) -> dict:
    """Window ``window`` evaluated in a fresh process by ``served_ckpt``'s weights: the
    stream resumed from the checkpoint after window - 1 (its store and position), the served
    checkpoint's weights loaded over the model with the export's loader, the corpus the
    items known at the served checkpoint."""
    after = {json.loads((p / "online.json").read_text())["windows"]: p
             for p in (run_dir / "ckpt").glob("iter_*")}
    known = json.loads((served_ckpt / "stream.json").read_text())["num_items"]
    params = _params(data, tmp / "probe", "retrieval",
                     [f'TrainerArgs.ckpt_load_dir="{after[window - 1]}"',
                      "StreamArgs.score_served=False"])
    script = f"""
import json
import gin
from hstu.config import load_config
from hstu.data.sizes import resolve_sizes
from hstu.training.checkpoint_manager import load_weights
from hstu.training.distributed import init_distributed, destroy_distributed
from hstu.training.online import OnlineTrainer
gin.clear_config()
cfg = resolve_sizes(load_config({str(ROOT / 'configs' / 'debug_retrieval.gin')!r}, {params!r},
                                task="retrieval"))
env = init_distributed(1)
o = OnlineTrainer(cfg, env, {str(tmp / 'probe')!r}, "x")
window = next(iter(o.windows()))
load_weights(o.trainer.model, {str(served_ckpt)!r})
work = o.prepare_window(o.store.sequences(o.store.screen(window, "insert")[0]))
print("PROBE", json.dumps(o.evaluate_window(work, known={known})))
o.close()
destroy_distributed()
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(proc.stdout.split("PROBE ", 1)[1].splitlines()[0])


@pytest.mark.slow  # a stream run, a publish and a served probe (30 s)
def test_served_rows_after_a_publish(data, tmp_path):
    run_dir = tmp_path / "run"
    first = run(data, run_dir, extra=[*SERVED, "TrainerArgs.max_train_iters=4"])
    assert "nothing is served in" in first and "served_" not in (run_dir / "metrics.csv").read_text()
    k = max(stream_by_window(run_dir))
    name = publish(run_dir)
    served_ckpt = Path(json.loads((run_dir / "serving" / name / "manifest.json").read_text())
                       ["checkpoint"]["path"])
    assert json.loads((served_ckpt / "online.json").read_text())["windows"] == k
    out = run(data, run_dir, extra=SERVED)
    assert f"served version: {name} (checkpoint {served_ckpt.name}, after window {k}" in out
    by_window = stream_by_window(run_dir)
    last = max(by_window)
    assert last >= k + 2, by_window.keys()
    for w, values in by_window.items():
        served = {n for n in values if n.startswith("served_")}
        if w <= k:
            assert not served, (w, served)  # nothing was served: no rows, never zeros
            continue
        assert {"served_step", "served_HR@10", "served_NDCG@10", "served_HR@10_cumulative",
                "served_HR@10_faded"} <= served, (w, served)
        assert values["served_step"] == int(name[1:])
    # the cumulative mean covers the served windows only, weighted by their events
    ws = [by_window[w] for w in range(k + 1, last + 1)]
    assert by_window[last]["served_HR@10_cumulative"] == pytest.approx(
        sum(w["served_HR@10"] * w["eval_events"] for w in ws) / sum(w["eval_events"] for w in ws))
    # the published checkpoint, evaluated alone on a later window: the very same figures
    w = k + 2
    alone = probe(data, run_dir, tmp_path, w, served_ckpt)
    assert alone["eval_events"] == by_window[w]["eval_events"]
    for metric in ("HR@10", "NDCG@10"):
        assert alone[metric] == by_window[w]["served_" + metric], (metric, alone, by_window[w])
    # ... and not the trained model's, which learned from the windows since
    assert any(by_window[v]["served_NDCG@10"] != by_window[v]["NDCG@10"]
               for v in range(k + 2, last + 1))
    # every window's choice is recorded (a resume after a kill takes it again)
    log = [json.loads(line) for line in (run_dir / "served.jsonl").read_text().splitlines()]
    assert [e["window"] for e in log] == list(range(1, last + 1))
    assert [e["version"] and e["version"]["name"] for e in log] == [None] * k + [name] * (last - k)


@pytest.mark.slow
def test_sigkill_and_resume_scores_the_windows_again_with_the_recorded_versions(data, tmp_path):
    """Served v_k from window k + 1; a run SIGKILLed after window k + 2 (its checkpoint after
    k + 1), then a newer version published from that checkpoint before the resume: the resume
    scores window k + 2 again with v_k (the choice recorded before the kill), not the newer
    LATEST, and the windows after it with the newer one. The rows up to k + 2 and the trained
    weights equal those of a run that served v_k throughout."""
    import shutil

    from tests.training.test_online import checkpoint_state, newest

    run_dir = tmp_path / "run"
    run(data, run_dir, extra=[*SERVED, "TrainerArgs.max_train_iters=4"])
    k = max(stream_by_window(run_dir))
    first = publish(run_dir)
    reference = tmp_path / "reference"
    shutil.copytree(run_dir, reference)
    run(data, reference, extra=SERVED)
    env = _env()
    env["HSTU_KILL_AT"] = "append:2"
    proc = subprocess.run(_cmd(data, run_dir, "retrieval", SERVED, kill_at=True), cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode != 0, (proc.stdout + proc.stderr)[-3000:]
    second = publish(run_dir)  # the newest checkpoint: after window k + 1
    assert json.loads((newest(run_dir) / "online.json").read_text())["windows"] == k + 1
    out = run(data, run_dir, extra=SERVED)
    assert "stream: resumed after" in out
    got, want = stream_by_window(run_dir), stream_by_window(reference)
    assert sorted(got) == sorted(want)
    for w in range(1, k + 3):
        assert got[w] == want[w], w
    assert got[k + 2]["served_step"] == int(first[1:])
    for w in range(k + 3, max(got) + 1):
        assert got[w]["served_step"] == int(second[1:]) and want[w]["served_step"] == int(first[1:])
    log = [json.loads(line)["window"] for line in (run_dir / "served.jsonl").read_text().splitlines()]
    assert log == list(range(1, max(got) + 1))  # window k + 2 recorded once, before the kill
    a, b = checkpoint_state(newest(run_dir)), checkpoint_state(newest(reference))
    test_online.assert_same(a["tables"], b["tables"], "tables")
    test_online.assert_same(a["dense"], b["dense"], "dense")
