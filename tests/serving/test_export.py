"""From a checkpoint to recommendations (issue "export"): train the debug presets a few steps,
export, and read the artifact in a process where torchrec, megatron and gin cannot be
imported; its top-K ids and scores (retrieval) and candidate scores (ranking) must be the
trainer's own evaluation of the same checkpoint, users for users. Bad input gives one line.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# a process that has torch and the hstu sources, but in which torchrec/megatron/gin fail to import
BLOCKED = (
    "import runpy, sys\n"
    "for m in ('torchrec', 'megatron', 'gin', 'fbgemm_gpu'): sys.modules[m] = None\n"
    "sys.argv = ['hstu.recommend', *sys.argv[1:]]\n"
    "runpy.run_module('hstu.recommend', run_name='__main__', alter_sys=True)\n"
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    return env


def _run(cmd: list[str], timeout: int = 300, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    if ok:
        assert proc.returncode == 0, f"{cmd[:4]} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}"
    return proc


def recommend(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-c", BLOCKED, *args], ok=ok)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


def _train_export_reference(tmp: Path, task: str, *params: str, name: str = "") -> dict:
    name = name or task
    run_dir, data = tmp / name, tmp / "data" / "synthetic"
    extra = [a for p in params for a in ("--gin-param", p)]
    _run([sys.executable, str(ROOT / f"pretrain_gr_{task}.py"), "--gin-config-file",
          str(ROOT / "configs" / f"debug_{task}.gin"),
          "--gin-param", f'TrainerArgs.run_dir="{run_dir}"',
          "--gin-param", f'DatasetArgs.dataset_path="{data}"',
          "--gin-param", "TrainerArgs.ckpt_save_interval=20",
          "--gin-param", f'TrainerArgs.ckpt_save_dir="{run_dir / "ckpt"}"', *extra])
    art = tmp / f"{name}_artifact"
    # the configuration comes from the checkpoint itself (no --gin-config-file)
    _run([sys.executable, "-m", "hstu.export", "--ckpt", str(run_dir / "ckpt"), "--out", str(art), "--no-aoti"])
    ref = tmp / f"{name}_reference.pt"
    _run([sys.executable, "-m", "tests.serving.reference", task, str(data), str(run_dir / "ckpt"),
          str(tmp / f"{name}_ref_run"), str(ref), *params])
    return {"art": art, "data": data, "reference": torch.load(ref, weights_only=False), "run_dir": run_dir}


@pytest.fixture(scope="module")
def retrieval(tmp) -> dict:
    return _train_export_reference(tmp, "retrieval")


@pytest.fixture(scope="module")
def ranking(tmp) -> dict:
    return _train_export_reference(tmp, "ranking")


def _raw_users(data: Path) -> list:
    return pq.read_table(data / "sequences.parquet").column("raw_user_id").to_pylist()


def _model_ids(art: Path) -> dict:
    m = pq.read_table(art / "item_map.parquet")
    return dict(zip([str(r) for r in m.column("raw_item_id").to_pylist()], m.column("item_id").to_pylist()))


def test_artifact_files_and_manifest(retrieval) -> None:
    art = retrieval["art"]
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["format"] == "hstu-artifact" and manifest["task"] == "retrieval"
    assert manifest["checkpoint"]["step"] == 20 and manifest["dataset"]["name"] == "synthetic"
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["metrics"], "the checkpoint step's evaluation metrics are in the manifest"
    for name in ("tables.pt", "dense.pt2", "dense_weights.pt", "item_embeddings.parquet", "item_map.parquet"):
        assert (art / name).is_file(), name
    dump = pq.read_table(art / "item_embeddings.parquet")
    assert dump.num_rows == manifest["dataset"]["num_items"] - 1  # id 0 is never an item
    assert dump.schema.field("vector").type.list_size == manifest["model"]["hidden_size"]


@pytest.fixture(scope="module")
def retrieval_narrow_items(tmp) -> dict:
    # item table of 8 dims under hidden_size 16: the queries are projected down to 8
    return _train_export_reference(tmp, "retrieval", "NetworkArgs.item_embedding_dim=8", name="narrow")


def test_retrieval_top_k_equals_the_trainer_evaluation(retrieval, tmp) -> None:
    _check_top_k(retrieval, tmp)


@pytest.mark.slow
def test_narrow_item_table_exports_to_the_trainer_evaluation(retrieval_narrow_items, tmp) -> None:
    art = retrieval_narrow_items["art"]
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["model"]["query_projection"] == 8 and manifest["model"]["hidden_size"] == 16
    assert pq.read_table(art / "item_embeddings.parquet").schema.field("vector").type.list_size == 8
    _check_top_k(retrieval_narrow_items, tmp)


def _check_top_k(retrieval: dict, tmp: Path) -> None:
    out = tmp / f"top10_{retrieval['art'].name}.csv"
    proc = recommend("--model", str(retrieval["art"]), "--input", str(retrieval["data"]), "--out", str(out),
                     "--top-k", "10", "--holdout-last", "1")
    ref = retrieval["reference"]
    raw_users = _raw_users(retrieval["data"])
    to_model = _model_ids(retrieval["art"])
    got_ids, got_scores = defaultdict(list), defaultdict(list)
    with open(out) as fh:
        for row in csv.DictReader(fh):
            got_ids[row["user_id"]].append(to_model[row["item_id"]])
            got_scores[row["user_id"]].append(float(row["score"]))
    assert len(got_ids) == len(ref["users"])
    for i, u in enumerate(ref["users"].tolist()):
        user = str(raw_users[u])
        assert got_ids[user] == ref["top_ids"][i].tolist(), f"user {user}"
        torch.testing.assert_close(torch.tensor(got_scores[user]), ref["top_scores"][i], rtol=0, atol=1e-5)
    # HR@10 from the output is the trainer's
    hr = float(proc.stdout.split("HR@10 of the held-out items ")[1].split()[0])
    assert hr == pytest.approx(ref["metrics"]["HR@10"], abs=1e-4)


@pytest.mark.slow
def test_ranking_scores_equal_the_trainer_forward(ranking, tmp) -> None:
    out = tmp / "scores.parquet"
    recommend("--model", str(ranking["art"]), "--input", str(ranking["data"]), "--out", str(out),
              "--holdout-last", "4")
    table = pq.read_table(out)
    width = ranking["reference"]["logits"].shape[1]
    got = torch.tensor([table.column(f"logit_{j}").to_pylist() for j in range(width)]).t()
    torch.testing.assert_close(got, ranking["reference"]["logits"], rtol=0, atol=1e-5)
    assert "p_class0" in table.column_names  # a 5-class head: softmax probabilities per class


@pytest.mark.slow
def test_ranking_cached_history_in_the_artifact(ranking) -> None:
    """The exported cached-history pair gives the exported full forward's candidate scores."""
    code = (
        "import sys, torch\n"
        "for m in ('torchrec', 'megatron', 'gin', 'fbgemm_gpu'): sys.modules[m] = None\n"
        "from hstu.serving.artifact import Artifact, example_inputs\n"
        f"art = Artifact({str(ranking['art'])!r})\n"
        "items, lengths, cands, ts, acts, ctx = example_inputs(art.cfg)['forward'][0]\n"
        "full = art.run((items, lengths, cands, ts, acts, ctx))\n"
        "hist = lengths - cands\n"
        "h = int(hist.max())\n"
        "cache = art.cache_program('encode_history')(items[:, :h], hist, None, acts[:, :h], ctx, None)\n"
        "idx = (hist.unsqueeze(1) + torch.arange(int(cands.max()))).clamp(max=items.shape[1] - 1)\n"
        "c_items = items.gather(1, idx.unsqueeze(-1).expand(-1, -1, items.shape[2]))\n"
        "got = art.cache_program('score_candidates')(*cache, c_items, cands, None)\n"
        "for b in range(len(hist)):\n"
        "    want = full[b, int(hist[b]):int(lengths[b])]\n"
        "    torch.testing.assert_close(got[b, :int(cands[b])], want, rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    assert _run([sys.executable, "-c", code]).stdout.strip().endswith("ok")


# ------------------------------------------------------------------------ bad input


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_artifact_of_another_version(retrieval, tmp) -> None:
    other = tmp / "old_artifact"
    shutil.copytree(retrieval["art"], other, dirs_exist_ok=True)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["format_version"] = 0
    (other / "manifest.json").write_text(json.dumps(manifest))
    line = _one_line(recommend("--model", str(other), "--input", str(retrieval["data"]),
                               "--out", str(tmp / "x.csv"), ok=False))
    assert "version 0" in line and "re-export" in line


def test_not_an_artifact(tmp) -> None:
    line = _one_line(recommend("--model", str(tmp), "--input", "x.csv", "--out", str(tmp / "x.csv"), ok=False))
    assert "not an hstu artifact" in line


def test_unknown_item_ids_are_skipped_and_counted(retrieval, tmp) -> None:
    table = pq.read_table(retrieval["data"] / "sequences.parquet").slice(0, 3)
    events = tmp / "events.csv"
    with open(events, "w") as fh:
        # raw user ids in ``user`` (the user id feature comes through the artifact's user map;
        # a ``user_id`` column would be read as the raw user id, as training's own data does)
        fh.write("user,item,timestamp,action,segment\n")
        for row in table.to_pylist():
            fh.writelines(f"{row['raw_user_id']},{item},{ts},{act},{row['segment']}\n" for item, ts, act in zip(row["item_ids"][:5], row["timestamps"][:5], row["actions"][:5]))
            fh.write(f"{row['raw_user_id']},999999,{row['timestamps'][5]},1,{row['segment']}\n")
        fh.write("ghost,888888,5,1,1\n")  # a user whose only event is unknown
    out = tmp / "from_events.parquet"
    proc = recommend("--model", str(retrieval["art"]), "--input", str(events), "--out", str(out), "--top-k", "5")
    assert "skipped 4 events whose item ids the model does not know" in proc.stderr
    assert "skipped 1 users" in proc.stderr
    result = pq.read_table(out)
    assert result.num_rows == 3 * 5 and set(result.column("rank").to_pylist()) == {1, 2, 3, 4, 5}


@pytest.mark.slow
def test_empty_histories_file(retrieval, tmp) -> None:
    empty = tmp / "empty.csv"
    empty.write_text("")
    line = _one_line(recommend("--model", str(retrieval["art"]), "--input", str(empty),
                               "--out", str(tmp / "y.csv"), ok=False))
    assert "empty file" in line
    header = tmp / "header.csv"
    header.write_text("user,item,timestamp\n")
    line = _one_line(recommend("--model", str(retrieval["art"]), "--input", str(header),
                               "--out", str(tmp / "y.csv"), ok=False))
    assert "no events" in line


# ------------------------------------------------------------- other world and TP sizes


def test_merge_tp_shards_inverts_the_layer_sharding() -> None:
    from hstu.export import merge_tp_shards
    from hstu.model.tensor_parallel import shard_output_weight, shard_uvqk

    heads, hd, width = 4, 3, 10
    full = {"layers.0.uvqk.weight": torch.randn(4 * heads * hd, width), "layers.0.uvqk.bias": torch.randn(4 * heads * hd),
            "layers.0.output.weight": torch.randn(width, heads * hd), "layers.0.output.bias": torch.randn(width),
            "layers.0.output_norm_weight": torch.randn(heads * hd), "layers.0.input_norm_weight": torch.randn(width)}
    shards = []
    for rank in range(2):
        s = {k: v for k, v in full.items()}
        s["layers.0.uvqk.weight"] = shard_uvqk(full["layers.0.uvqk.weight"], heads, hd, 2, rank)
        s["layers.0.uvqk.bias"] = shard_uvqk(full["layers.0.uvqk.bias"], heads, hd, 2, rank)
        s["layers.0.output.weight"] = shard_output_weight(full["layers.0.output.weight"], 2, rank)
        s["layers.0.output_norm_weight"] = full["layers.0.output_norm_weight"].chunk(2)[rank]
        s["layers.0.uvqk._extra_state"] = None
        shards.append(s)
    merged = merge_tp_shards(shards, heads, hd)
    assert set(merged) == set(full)
    for k, v in full.items():
        assert torch.equal(merged[k], v), k


@pytest.mark.slow
def test_a_tp2_checkpoint_exports_to_the_same_scores(tmp) -> None:
    """Trained with TP=2 on 2 processes, exported on one: the artifact's evaluation loss and
    AUC over the whole test split are the TP=2 trainer's."""
    import torch.nn.functional as F
    from torchmetrics.functional.classification import multiclass_auroc

    run_dir, data = tmp / "tp2", tmp / "data" / "synthetic"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(ROOT / "pretrain_gr_ranking.py"), "--gin-config-file", str(ROOT / "configs" / "debug_ranking.gin"),
          "--gin-param", "TensorModelParallelArgs.tensor_model_parallel_size=2",
          "--gin-param", f'TrainerArgs.run_dir="{run_dir}"', "--gin-param", f'DatasetArgs.dataset_path="{data}"',
          "--gin-param", "TrainerArgs.ckpt_save_interval=20", "--gin-param", "TrainerArgs.max_eval_iters=None",
          "--gin-param", f'TrainerArgs.ckpt_save_dir="{run_dir / "ckpt"}"'])
    art, out = tmp / "tp2_artifact", tmp / "tp2_scores.parquet"
    _run([sys.executable, "-m", "hstu.export", "--ckpt", str(run_dir / "ckpt"), "--out", str(art), "--no-aoti"])
    assert json.loads((art / "manifest.json").read_text())["checkpoint"]["tp_size"] == 2
    recommend("--model", str(art), "--input", str(data), "--out", str(out), "--holdout-last", "4")
    with open(run_dir / "metrics.csv") as fh:
        want = {r["name"]: float(r["value"]) for r in csv.DictReader(fh) if r["split"] == "eval" and r["step"] == "20"}
    table = pq.read_table(out)
    logits = torch.tensor([table.column(f"logit_{j}").to_pylist() for j in range(5)]).t()
    labels = torch.tensor(table.column("label").to_pylist())
    assert float(F.cross_entropy(logits, labels)) == pytest.approx(want["loss"], abs=1e-5)
    assert float(multiclass_auroc(logits, labels, num_classes=5, average="macro")) == pytest.approx(want["AUC"], abs=1e-5)


@pytest.mark.slow
def test_ranking_candidates_file(ranking, tmp) -> None:
    """Raw events plus a candidates file give the same scores as holding the same events out."""
    table = pq.read_table(ranking["data"] / "sequences.parquet").slice(0, 4)
    events, cands = tmp / "rank_events.csv", tmp / "rank_cands.csv"
    with open(events, "w") as ev, open(cands, "w") as ca:
        ev.write("user,item,timestamp,action,user_id,segment\n")
        ca.write("user,item,timestamp\n")
        for row in table.to_pylist():
            items, stamps, acts = row["item_ids"], row["timestamps"], row["actions"]
            ev.writelines(f"{row['raw_user_id']},{i},{t},{a},{row['user_id']},{row['segment']}\n" for i, t, a in zip(items[:-4], stamps[:-4], acts[:-4]))
            ca.writelines(f"{row['raw_user_id']},{i},{t}\n" for i, t in zip(items[-4:], stamps[-4:]))
    out_c, out_h = tmp / "rank_c.parquet", tmp / "rank_h.parquet"
    recommend("--model", str(ranking["art"]), "--input", str(events), "--candidates", str(cands), "--out", str(out_c))
    full = tmp / "rank_full.csv"
    with open(full, "w") as fh:
        fh.write("user,item,timestamp,action,user_id,segment\n")
        for row in table.to_pylist():
            fh.writelines(f"{row['raw_user_id']},{i},{t},{a},{row['user_id']},{row['segment']}\n" for i, t, a in zip(row["item_ids"], row["timestamps"], row["actions"]))
    recommend("--model", str(ranking["art"]), "--input", str(full), "--holdout-last", "4", "--out", str(out_h))
    a, b = pq.read_table(out_c), pq.read_table(out_h)
    assert a.num_rows == b.num_rows == 16
    assert a.column("item_id").to_pylist() == b.column("item_id").to_pylist()
    for j in range(5):
        torch.testing.assert_close(torch.tensor(a.column(f"logit_{j}").to_pylist()),
                                   torch.tensor(b.column(f"logit_{j}").to_pylist()), rtol=0, atol=1e-6)


def test_an_aoti_package_that_does_not_load_is_named_then_the_portable_program_runs(retrieval, tmp, capsys) -> None:
    """A compiled package from another host (here: not a package at all) is not used; the
    artifact says which file failed and why, and runs the portable program."""
    from hstu.serving.artifact import Artifact

    other = tmp / "bad_aoti_artifact"
    shutil.copytree(retrieval["art"], other, dirs_exist_ok=True)
    (other / "dense.aoti.pt2").write_bytes(b"not a package")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["aoti"] = {"package": "dense.aoti.pt2"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    art = Artifact(other)
    assert art.runtime == "torch.export"
    assert art.fallback is not None and "dense.aoti.pt2: the AOTInductor package did not load" in art.fallback
    assert art.fallback in capsys.readouterr().err
    assert Artifact(retrieval["art"]).fallback is None  # no package: nothing to say
