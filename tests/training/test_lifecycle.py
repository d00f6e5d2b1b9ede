"""The checkpoint lifecycle on its own (2 gloo ranks, tiny states): save, verify, prune,
auto-resume, best, and every fault as one CheckpointError line with the latest intact."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_multiprocess


def _states(rank: int, value: float) -> tuple[dict, dict, dict, dict]:
    sharded = {"tables": {"item": torch.full((4, 2), value), "user": torch.full((3, 2), value)}}
    dense = {"model": {"w": torch.full((2,), value)}, "num_steps": 1}
    rng = {"torch": torch.get_rng_state()}
    return sharded, dense, rng, {"world_size": dist.get_world_size(), "tp_size": 1}


def _save(lc, step: int, value: float = 1.0) -> str:
    rank = dist.get_rank()
    sharded, dense, rng, meta = _states(rank, value)
    return _save_state(lc, step, sharded, dense, meta, rng)


def _save_state(lc, step: int, sharded: dict, dense: dict, meta: dict, rng: dict) -> str:
    from hstu.training.checkpoint import CheckpointState, RankPlace

    rank = dist.get_rank()
    state = CheckpointState(sharded, dense, {**meta, "step": step}, rng)
    return lc.save(step, state, RankPlace(rank, 0, rank))


def _load(path: str) -> tuple[dict, dict, dict | None, dict]:
    from hstu.training.checkpoint import RankPlace, load_checkpoint

    sharded, _, _, _ = _states(dist.get_rank(), 0.0)
    loaded = load_checkpoint(path, sharded, RankPlace(dist.get_rank(), 0, dist.get_rank()))
    return sharded, loaded.dense, loaded.rng, loaded.meta


def _body_save_prune_resume(rank: int, world_size: int, tmp: str) -> None:
    from hstu.training.lifecycle import CheckpointLifecycle

    root = os.path.join(tmp, "ckpt")
    lc = CheckpointLifecycle(root, keep_last_n=2, log=lambda _m: None)
    assert lc.resolve("auto") is None  # an empty (even missing) root: start fresh
    for step in (5, 10, 15, 20):
        _save(lc, step, value=float(step))
    names = sorted(os.listdir(root))
    assert names == ["iter_15", "iter_20", "latest"], names  # keep_last_n keeps exactly 2
    with open(os.path.join(root, "iter_20", "manifest.json")) as fh:
        manifest = json.load(fh)
    assert {"meta.pt", ".metadata", "dense_tp0.pt", "rng_rank0.pt", "rng_rank1.pt"} <= set(manifest["files"])
    assert lc.resolve("auto") == os.path.join(root, "iter_20")
    assert lc.resolve(root) == os.path.join(root, "iter_20")
    sharded, _, rng, meta = _load(lc.resolve("auto"))
    assert meta["step"] == 20 and rng is not None
    assert torch.equal(sharded["tables"]["item"], torch.full((4, 2), 20.0))
    # the same step twice in one process is written once
    assert _save(lc, 20, value=99.0) == os.path.join(root, "iter_20")
    assert torch.equal(_load(root)[0]["tables"]["item"], torch.full((4, 2), 20.0))
    dist.barrier()


def test_save_prune_and_auto_resume(tmp_path):
    run_multiprocess(_body_save_prune_resume, world_size=2, tmp=str(tmp_path))


def _body_damage(rank: int, world_size: int, tmp: str, damage: str) -> None:
    from hstu.training.checkpoint import CheckpointError
    from hstu.training.lifecycle import CheckpointLifecycle

    root = os.path.join(tmp, "ckpt")
    lc = CheckpointLifecycle(root, keep_last_n=None, log=lambda _m: None)
    _save(lc, 5, 5.0)
    _save(lc, 10, 10.0)
    dist.barrier()
    victim = os.path.join(root, "iter_10", damage)
    if rank == 0:
        if damage == "rng_rank1.pt":
            os.remove(victim)
        else:
            with open(victim, "r+b") as fh:
                fh.truncate(os.path.getsize(victim) // 2)
    dist.barrier()
    with pytest.raises(CheckpointError) as err:
        _load(os.path.join(root, "iter_10"))
    line = str(err.value)
    assert "\n" not in line and victim in line, line
    assert ("missing" if damage == "rng_rank1.pt" else "truncated") in line
    # auto skips the damaged one: the previous checkpoint is intact and loads
    fresh = CheckpointLifecycle(root, keep_last_n=None, log=lambda _m: None)
    assert fresh.resolve("auto") == os.path.join(root, "iter_5")
    assert _load(fresh.resolve("auto"))[3]["step"] == 5
    dist.barrier()


@pytest.mark.parametrize("damage", ["__0_0.distcp", "dense_tp0.pt", "rng_rank1.pt"])
def test_damaged_files_give_one_line_naming_the_file(tmp_path, damage):
    run_multiprocess(_body_damage, world_size=2, tmp=str(tmp_path), damage=damage)


def _body_write_fault(rank: int, world_size: int, tmp: str, code: int) -> None:
    from hstu.training.checkpoint import CheckpointError
    from hstu.training.lifecycle import CheckpointLifecycle

    root = os.path.join(tmp, "ckpt")
    lc = CheckpointLifecycle(root, keep_last_n=1, log=lambda _m: None)
    _save(lc, 5, 5.0)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):  # the device fills up under rank 1's dense write
        path = getattr(f, "name", f)  # a path or a file object
        if rank == 1 and "rng_rank1" in str(path):
            raise OSError(code, os.strerror(code), str(path))
        return real_save(obj, f, *a, **k)

    torch.save = failing_save
    try:
        with pytest.raises(CheckpointError) as err:
            _save(lc, 10, 10.0)
    finally:
        torch.save = real_save
    line = str(err.value)
    assert "\n" not in line and "iter_10.tmp/rng_rank1.pt" in line and "step 10" in line, line
    assert {errno.ENOSPC: "no space left", errno.EROFS: "read-only"}[code] in line
    dist.barrier()
    assert sorted(os.listdir(root)) == ["iter_5", "latest"]  # no .tmp left, the latest intact
    with open(os.path.join(root, "latest")) as fh:
        assert fh.read().strip() == "iter_5"
    assert _load(root)[3]["step"] == 5
    dist.barrier()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_write_faults_keep_the_latest(tmp_path, code):
    run_multiprocess(_body_write_fault, world_size=2, tmp=str(tmp_path), code=code)


def _body_non_finite(rank: int, world_size: int, tmp: str) -> None:
    from hstu.training.lifecycle import CheckpointLifecycle

    root = os.path.join(tmp, "ckpt")
    lc = CheckpointLifecycle(root, keep_last_n=None, log=lambda _m: None)
    _save(lc, 5, 5.0)
    sharded, dense, rng, meta = _states(rank, 1.0)
    if rank == 1:
        sharded["tables"]["user"][0, 0] = float("inf")  # one rank's shard only
    with pytest.raises(FloatingPointError, match="step 10: the embeddings weights .* not finite"):
        _save_state(lc, 10, sharded, dense, meta, rng)
    assert sorted(os.listdir(root)) == ["iter_5", "latest"]
    dist.barrier()


def test_non_finite_weights_are_never_saved(tmp_path):
    run_multiprocess(_body_non_finite, world_size=2, tmp=str(tmp_path))


def _body_killed_second_save(rank: int, world_size: int, tmp: str) -> None:
    from hstu.training.lifecycle import CheckpointLifecycle

    root = os.path.join(tmp, "ckpt")
    _save(CheckpointLifecycle(root, log=lambda _m: None), 5, 5.0)
    real_replace = os.replace

    def die_between_renames(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("iter_5.old"):  # the old one moved aside, the new one not yet in
            os._exit(9)

    os.replace = die_between_renames
    _save(CheckpointLifecycle(root, log=lambda _m: None), 5, 6.0)  # a second save of step 5


def _body_after_kill(rank: int, world_size: int, tmp: str) -> None:
    from hstu.training.lifecycle import CheckpointLifecycle

    root = os.path.join(tmp, "ckpt")
    lc = CheckpointLifecycle(root, log=lambda _m: None)
    lc.clean_stale()
    assert lc.resolve("auto") == os.path.join(root, "iter_5")
    assert _load(root)[3]["step"] == 5
    assert sorted(os.listdir(root)) == ["iter_5", "latest"]


def test_kill_between_the_renames_of_a_second_save_keeps_a_loadable_latest(tmp_path):
    with pytest.raises(torch.multiprocessing.ProcessExitedException):
        run_multiprocess(_body_killed_second_save, world_size=1, tmp=str(tmp_path))
    names = sorted(os.listdir(tmp_path / "ckpt"))
    assert "iter_5.old" in names and "iter_5" not in names, names  # killed in the window
    run_multiprocess(_body_after_kill, world_size=1, tmp=str(tmp_path))


def _body_stale(rank: int, world_size: int, tmp: str) -> None:
    from hstu.training.lifecycle import CheckpointLifecycle

    root = os.path.join(tmp, "ckpt")
    lc = CheckpointLifecycle(root, log=lambda _m: None)
    _save(lc, 5)
    if rank == 0:
        os.makedirs(os.path.join(root, "iter_10.tmp"))  # a save killed half way
        shutil.copytree(os.path.join(root, "iter_5"), os.path.join(root, "iter_5.old"))
    dist.barrier()
    removed = CheckpointLifecycle(root, log=lambda _m: None).clean_stale()
    if rank == 0:
        assert sorted(removed) == ["iter_10.tmp", "iter_5.old"]
    assert sorted(os.listdir(root)) == ["iter_5", "latest"]


def test_stale_folders_are_cleaned_at_start(tmp_path):
    run_multiprocess(_body_stale, world_size=2, tmp=str(tmp_path))


def _body_shape_mismatch(rank: int, world_size: int, tmp: str) -> None:
    from hstu.training.checkpoint import CheckpointError, RankPlace, load_checkpoint
    from hstu.training.lifecycle import CheckpointLifecycle

    place = RankPlace(rank, 0, rank)
    root = os.path.join(tmp, "ckpt")
    _save(CheckpointLifecycle(root, log=lambda _m: None), 5)
    other = {"tables": {"item": torch.zeros(6, 2), "user": torch.zeros(3, 2)}}
    with pytest.raises(CheckpointError, match=r"tables\.item is \[4, 2\] in the checkpoint, \[6, 2\] in this model"):
        load_checkpoint(root, other, place)
    fewer = {"tables": {"item": torch.zeros(4, 2)}}
    with pytest.raises(CheckpointError, match=r"the checkpoint has tables\.user, this model does not"):
        load_checkpoint(root, fewer, place)


def test_shape_or_table_mismatch_names_the_key(tmp_path):
    run_multiprocess(_body_shape_mismatch, world_size=2, tmp=str(tmp_path))


def test_best_tracker_state_round_trip():
    from hstu.training.lifecycle import BestTracker

    best = BestTracker("MRR", patience=2)
    assert best.update({"MRR": 0.1}, 3) == (True, False)
    assert best.update({"MRR": 0.05}, 6) == (False, False)
    restored = BestTracker("MRR", patience=2)
    restored.load_state_dict(best.state_dict())
    assert (restored.value, restored.step, restored.evals_since_best) == (0.1, 3, 1)
    assert restored.update({"MRR": 0.09}, 9) == (False, True)  # patience carried over the resume


def _body_full_disk(rank: int, world_size: int, tmp: str, root: str, emulate: bool) -> None:
    from hstu.training import checkpoint as ckpt
    from hstu.training.checkpoint import CheckpointError
    from hstu.training.lifecycle import CheckpointLifecycle

    lc = CheckpointLifecycle(root, keep_last_n=None, log=lambda _m: None)
    _save(lc, 5, 5.0)
    free = shutil.disk_usage(root).free if not emulate else 300 * 1024
    real_usage, real_save = shutil.disk_usage, torch.save
    if emulate:  # no tmpfs here: the file system reports what a small one would
        ckpt.shutil.disk_usage = lambda p: real_usage(p)._replace(free=free)

    def save(step: int, payload_bytes: int) -> str:
        sharded, dense, rng, meta = _states(rank, float(step))
        dense["model"]["big"] = torch.ones(payload_bytes // 4)  # written by rank 0 (DP rank 0)
        with pytest.raises(CheckpointError) as err:
            _save_state(lc, step, sharded, dense, meta, rng)
        line = str(err.value)
        assert "\n" not in line and f"step {step}: cannot write checkpoint file" in line, line
        assert "no space left on " in line and "(ENOSPC)" in line and "MB free" in line, line
        dist.barrier()
        assert sorted(os.listdir(root)) == ["iter_5", "latest"], os.listdir(root)
        assert _load(root)[3]["step"] == 5
        dist.barrier()
        return line

    try:
        # known to be too large before writing: refused with the numbers, nothing written
        line = save(10, 2 * free)
        need, left = (float(x) for x in re.search(r"need ~([\d.,]+) MB, ([\d.,]+) MB free", line).groups())
        assert need >= 1.9 * free / 2**20 and abs(left - free / 2**20) < 0.1, line
        # fits by the tensors' bytes, not with the files' overhead: the write fails (torch's
        # zip writer loses the errno: "unexpected pos ...") and the line still says why
        if emulate:
            def failing_save(obj, f, *a, **k):
                if "dense" in str(getattr(f, "name", f)):  # a path or a file object
                    ckpt.shutil.disk_usage = lambda p: real_usage(p)._replace(free=0)
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
                return real_save(obj, f, *a, **k)

            torch.save = failing_save
        sharded, dense, rng, _ = _states(rank, 0.0)
        others = world_size * ckpt.state_bytes(sharded, rng) + ckpt.state_bytes(dense)
        line = save(15, free - others - 1024)  # 1 KB to spare by the tensors' bytes
        assert "before the save" in line, line
    finally:
        ckpt.shutil.disk_usage, torch.save = real_usage, real_save


def test_a_full_disk_is_named_with_the_numbers_and_keeps_the_latest(tmp_path):
    """A real small tmpfs where this host lets the test mount one, else the same sizes as the
    file system would report them."""
    import subprocess

    root = tmp_path / "ckpt"
    root.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=384k", "tmpfs", str(root)],
        capture_output=True, check=False,
    ).returncode == 0 if os.geteuid() == 0 else False
    try:
        run_multiprocess(_body_full_disk, world_size=2, tmp=str(tmp_path), root=str(root),
                         emulate=not mounted)
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=True)


def _curve(best, values: list[float], stderr: float = 0.01, start: int = 10
           ) -> list[tuple[bool, bool]]:
    """``best.update`` with each value in turn, at steps start, start + 10, ..."""
    return [best.update({"NDCG@10": v, "stderr/NDCG@10": stderr}, start + 10 * i)
            for i, v in enumerate(values)]


def test_best_tracker_within_stderr_keeps_the_latest_evaluation_validation_cannot_tell_apart():
    from hstu.training.lifecycle import BestTracker

    plain, tolerant = BestTracker("NDCG@10"), BestTracker("NDCG@10", tolerance=1.0)
    # a noisy plateau: 0.150 at step 20 is the highest; 0.141, 0.145 and 0.142 (steps 30, 40,
    # 60) are within one standard error (0.01) of it, 0.139 and 0.135 (50, 70) are not
    values = [0.120, 0.150, 0.141, 0.145, 0.139, 0.142, 0.135]
    assert [new for new, _ in _curve(plain, values)] == [True, True] + [False] * 5
    assert [new for new, _ in _curve(tolerant, values)] == [True] * 4 + [False, True, False]
    assert (plain.step, plain.value) == (20, 0.150)
    assert (tolerant.step, tolerant.value) == (60, 0.142)
    assert (tolerant.peak_step, tolerant.peak_value, tolerant.margin) == (20, 0.150, 0.01)
    # a new highest value is selected and moves the peak: an evaluation above the old peak
    # but more than one standard error under the new one is not selected
    assert _curve(tolerant, [0.170, 0.155], start=80) == [(True, False), (False, False)]
    assert (tolerant.step, tolerant.peak_step) == (80, 80)


def test_best_tracker_within_stderr_patience_counts_the_evaluations_outside_the_tolerance():
    from hstu.training.lifecycle import BestTracker

    best = BestTracker("NDCG@10", patience=2, tolerance=2.0)
    # 0.135 is within 2 standard errors (0.02) of 0.150: it resets the patience
    assert _curve(best, [0.150, 0.120, 0.135, 0.120, 0.125]) == [
        (True, False), (False, False), (True, False), (False, False), (False, True)]
    # without the tolerance the same curve stops one evaluation earlier
    assert _curve(BestTracker("NDCG@10", patience=2), [0.150, 0.120, 0.135])[-1] == (False, True)


def test_best_tracker_within_stderr_state_round_trip_and_needs_a_standard_error():
    from hstu.training.lifecycle import BestTracker

    best = BestTracker("NDCG@10", patience=3, tolerance=1.0)
    _curve(best, [0.150, 0.145, 0.100])
    state = best.state_dict()
    assert "tolerance" not in state  # the run's setting, not the checkpoint's
    restored = BestTracker("NDCG@10", patience=3, tolerance=1.0)
    restored.load_state_dict(state)
    assert (restored.step, restored.peak_step, restored.peak_stderr) == (20, 10, 0.01)
    after = {"NDCG@10": 0.141, "stderr/NDCG@10": 0.02}
    assert restored.update(after, 40) == best.update(after, 40) == (True, False)
    # a checkpoint written before the peak was tracked: its selection is the peak
    old = BestTracker("NDCG@10", tolerance=1.0)
    old.load_state_dict({"value": 0.15, "step": 5, "evals_since_best": 0})
    assert (old.peak_value, old.peak_step) == (0.15, 5)
    assert old.update({"NDCG@10": 0.12, "stderr/NDCG@10": 0.01}, 10) == (False, False)
    # a tolerance on metrics without a standard error is a bug, said as one, not a silent 0
    with pytest.raises(RuntimeError, match="no standard error of NDCG@10"):
        BestTracker("NDCG@10", tolerance=1.0).update({"NDCG@10": 0.1}, 1)


def test_best_tracker_prior_rule_skips_a_higher_metric_whose_loss_is_above_the_prior():
    from hstu.training.lifecycle import BestTracker

    best = BestTracker("AUC", loss_limit=1.0)
    assert best.update({"AUC": 0.60, "loss": 0.9}, 10) == (True, False)
    # a higher AUC with a loss above the prior is not selected (without the rule it would be)
    assert best.update({"AUC": 0.70, "loss": 1.2}, 20) == (False, False)
    assert (best.step, best.value, best.ineligible, best.fallback) == (10, 0.60, 1, False)
    # a loss equal to the prior's does not beat it either
    assert best.update({"AUC": 0.71, "loss": 1.0}, 30) == (False, False)
    assert best.update({"AUC": 0.65, "loss": 0.95}, 40) == (True, False)
    assert (best.step, best.value, best.ineligible) == (40, 0.65, 2)
    plain = BestTracker("AUC")
    plain.update({"AUC": 0.60, "loss": 0.9}, 10)
    assert plain.update({"AUC": 0.70, "loss": 1.2}, 20) == (True, False)


def test_best_tracker_prior_rule_falls_back_to_the_lowest_loss_until_one_is_eligible():
    from hstu.training.lifecycle import BestTracker

    best = BestTracker("AUC", patience=3, loss_limit=1.0)
    assert best.update({"AUC": 0.55, "loss": 1.5}, 10) == (True, False)  # provisional
    assert best.fallback and best.fallback_loss == 1.5
    assert best.update({"AUC": 0.70, "loss": 1.6}, 20) == (False, False)  # higher AUC, higher loss
    assert best.update({"AUC": 0.52, "loss": 1.1}, 30) == (True, False)  # lower loss
    assert (best.step, best.value, best.fallback, best.ineligible) == (30, 0.52, True, 3)
    # the first eligible evaluation replaces the fallback whatever its AUC
    assert best.update({"AUC": 0.50, "loss": 0.99}, 40) == (True, False)
    assert (best.step, best.fallback) == (40, False)
    # once one is eligible, an ineligible one with a lower loss no longer selects
    assert best.update({"AUC": 0.40, "loss": 1.05}, 50) == (False, False)
    assert best.step == 40


def test_best_tracker_prior_rule_state_round_trip():
    from hstu.training.lifecycle import BestTracker

    best = BestTracker("AUC", patience=2, loss_limit=1.0)
    best.update({"AUC": 0.6, "loss": 1.3}, 5)
    best.update({"AUC": 0.7, "loss": 1.4}, 10)
    state = best.state_dict()
    assert "loss_limit" not in state  # recomputed from the data at every start
    restored = BestTracker("AUC", patience=2, loss_limit=1.0)
    restored.load_state_dict(state)
    assert restored == best
    # the resumed tracker goes on exactly as the uninterrupted one
    assert restored.update({"AUC": 0.5, "loss": 1.2}, 15) == best.update({"AUC": 0.5, "loss": 1.2}, 15)
    assert restored == best and restored.step == 15 and restored.fallback
    # a checkpoint written before the rule existed (no ineligible/fallback keys) still loads
    old = BestTracker("AUC", loss_limit=1.0)
    old.load_state_dict({"value": 0.6, "step": 5, "evals_since_best": 0})
    assert (old.step, old.fallback, old.ineligible) == (5, False, 0)


def _body_checksums_while_writing(rank: int, world_size: int, tmp: str) -> None:
    import zlib

    from hstu.training import checkpoint as ckpt
    from hstu.training.lifecycle import CheckpointLifecycle

    def read_back(path: str, chunk: int = 1 << 22) -> int:
        raise AssertionError(f"a save read {path} back for its checksum")

    root = os.path.join(tmp, "ckpt")
    lc = CheckpointLifecycle(root, keep_last_n=None, log=lambda _m: None)
    real = ckpt._crc32
    ckpt._crc32 = read_back
    try:
        path = _save(lc, 7, value=3.0)
    finally:
        ckpt._crc32 = real
    with open(os.path.join(path, "manifest.json")) as fh:
        files = json.load(fh)["files"]
    assert {".metadata", "meta.pt", "dense_tp0.pt", "rng_rank0.pt", "rng_rank1.pt",
            "__0_0.distcp", "__1_0.distcp"} <= set(files), sorted(files)
    for name, want in files.items():  # the digests taken while writing are the files'
        with open(os.path.join(path, name), "rb") as fh:
            data = fh.read()
        assert (len(data), zlib.crc32(data)) == (want["size"], want["crc32"]), name
    ckpt.verify(path)  # a load's check passes
    dist.barrier()
    if rank == 0:  # one byte flipped, the size unchanged: still detected
        victim = os.path.join(path, "__1_0.distcp")
        with open(victim, "r+b") as fh:
            fh.seek(os.path.getsize(victim) // 2)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    with pytest.raises(ckpt.CheckpointError, match=r"__1_0\.distcp: checksum differs"):
        ckpt.verify(path)


def test_checksums_are_taken_while_writing_and_still_catch_damage(tmp_path):
    """A save's manifest holds each file's size and CRC32 from the bytes as they were written
    (no file read back: the read-back helper fails the test), equal to the files' own; a
    flipped byte in a table shard is still named at load."""
    run_multiprocess(_body_checksums_while_writing, world_size=2, tmp=str(tmp_path))


def test_best_tracker_keeps_the_highest_metric_of_any_evaluation():
    """The summary's "highest valid AUC ... not selected: ..." line reads these."""
    from hstu.training.lifecycle import BestTracker

    best = BestTracker("AUC", loss_limit=1.0)
    best.update({"AUC": 0.60, "loss": 0.9}, 10)
    best.update({"AUC": 0.70, "loss": 1.2}, 20)  # the highest, not eligible
    best.update({"AUC": 0.65, "loss": 0.95}, 30)
    assert (best.step, best.value) == (30, 0.65)
    assert (best.top_step, best.top_value, best.top_loss) == (20, 0.70, 1.2)
    restored = BestTracker("AUC", loss_limit=1.0)
    restored.load_state_dict(best.state_dict())  # kept over a resume
    assert (restored.top_step, restored.top_value) == (20, 0.70)
    plain = BestTracker("AUC")
    for auc, step in ((0.6, 1), (0.7, 2), (0.65, 3)):
        plain.update({"AUC": auc}, step)  # no loss in the metrics: NaN
    assert (plain.top_step, plain.step) == (2, 2) and plain.top_loss != plain.top_loss


def _body_pins(rank: int, world_size: int, tmp: str) -> None:
    """A checkpoint held by a live process (a publisher exporting it) survives pruning; a pin
    left by a process that is gone does not hold it, and is removed."""
    import subprocess
    import sys

    from hstu.training.checkpoint import PIN, pin
    from hstu.training.lifecycle import CheckpointLifecycle

    root = os.path.join(tmp, "ckpt")
    lc = CheckpointLifecycle(root, keep_last_n=1, log=lambda _m: None)
    first = _save(lc, 10)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    with pin(first) if rank == 0 else contextlib.nullcontext():
        dist.barrier()
        second = _save(lc, 20)
        dead_pin = second + PIN + dead.stdout.strip()
        if rank == 0:
            open(dead_pin, "w").close()
        dist.barrier()
        _save(lc, 30)
        names = sorted(os.listdir(root))
        assert "iter_10" in names and "iter_30" in names, names  # held; the newest
        assert "iter_20" not in names, names  # its pin's process is gone
        assert not os.path.exists(dead_pin)
    dist.barrier()
    _save(lc, 40)  # released: pruned like any other
    assert sorted(n for n in os.listdir(root) if n.startswith("iter_")) == ["iter_40"]
    assert not any(PIN in n for n in os.listdir(root))
    dist.barrier()


def test_a_checkpoint_held_by_a_live_reader_is_not_pruned(tmp_path):
    run_multiprocess(_body_pins, world_size=2, tmp=str(tmp_path))
