"""The checkpoint manifest checks on their own (one process, files written by hand): what a
resume, a load and pruning trust about a folder. Sizes and CRC32s are taken here with zlib over
the whole file (the reference), the manifests written as the saver writes them (JSON, sorted
keys)."""

from __future__ import annotations

import array
import errno
import json
import os
import zlib
from pathlib import Path

import pytest
import torch

from hstu.training import checkpoint as ckpt


def _digest(data: bytes) -> dict[str, int]:
    return {"size": len(data), "crc32": zlib.crc32(data)}


def _folder(root, name: str, files: dict[str, bytes], needs: dict[str, int] | None = None,
            manifest: bool = True) -> str:
    """A checkpoint folder ``root/name`` holding ``files`` and (unless not ``manifest``) their
    manifest, written the way the saver writes it."""
    folder = os.path.join(str(root), name)
    os.makedirs(folder)
    for file_name, data in files.items():
        with open(os.path.join(folder, file_name), "wb") as fh:
            fh.write(data)
    if manifest:
        body = {"step": ckpt.step_of(name), "world_size": 1,
                "files": {n: _digest(d) for n, d in files.items()}}
        if needs is not None:
            body["needs"] = needs
        with open(os.path.join(folder, ckpt.MANIFEST), "w") as fh:
            fh.write(json.dumps(body, indent=1, sort_keys=True))
    return folder


def _rewrite(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


FILES = {"meta.pt": b"meta-bytes", "b.distcp": b"0123456789" * 7, "c.pt": b"c"}


# ---------------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("name", "step"),
    [("iter_12", 12), ("iter_0", 0), ("iter_007", 7), ("iter_", None), ("iter_1a", None),
     ("xiter_3", None), ("iter_-1", None), ("latest", None), ("iter_5.old", None), ("3", None)],
)
def test_step_of(name, step):
    assert ckpt.step_of(name) == step


def test_checkpoint_folders_order_and_what_counts(tmp_path):
    for name in ("iter_9", "iter_10", "iter_10.old", "iter_2", "iter_x", "other", "iter_7.tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "iter_11").write_text("a file, not a folder")
    want = ["iter_10", "iter_10.old", "iter_9", "iter_2"]  # by step (not text), folder first
    assert ckpt.checkpoint_folders(str(tmp_path)) == [str(tmp_path / n) for n in want]
    assert ckpt.checkpoint_folders(str(tmp_path / "missing")) == []


# ------------------------------------------------------------------------------- digests
def test_crc32_in_chunks_equals_the_whole_file(tmp_path):
    data = bytes(range(256)) * 41 + b"tail"
    path = tmp_path / "f"
    path.write_bytes(data)
    for chunk in (1, 3, 256, 1 << 22):
        assert ckpt._crc32(str(path), chunk) == zlib.crc32(data)
    (tmp_path / "empty").write_bytes(b"")
    assert ckpt._crc32(str(tmp_path / "empty")) == 0


def test_the_digesting_writer_records_what_it_wrote(tmp_path):
    path = str(tmp_path / "w.bin")
    digests: dict = {}
    ints = array.array("i", [1, -2, 3])  # not bytes: counted in bytes
    with ckpt._DigestingWriter(path, digests) as fh:
        assert fh.writable() and not fh.seekable() and fh.name == path
        assert fh.write(b"abc") == 3
        assert fh.write(bytearray(b"de")) == 2
        assert fh.write(ints) == ints.itemsize * 3
        assert fh.tell() == 5 + ints.itemsize * 3
        assert digests == {}  # recorded at close
    data = Path(path).read_bytes()
    assert data == b"abcde" + ints.tobytes()
    assert digests == {os.path.abspath(path): _digest(data)}
    fh.close()  # a second close changes nothing
    assert digests == {os.path.abspath(path): _digest(data)}


def test_the_digesting_writer_refuses_a_short_write(tmp_path):
    class Short:
        def write(self, view):
            return len(view) - 1

    writer = ckpt._DigestingWriter(str(tmp_path / "s"), {})
    real, writer._fh = writer._fh, Short()
    with pytest.raises(OSError, match=r"short write \(3 of 4 bytes\)") as err:
        writer.write(b"abcd")
    assert err.value.errno == errno.EIO and err.value.filename == str(tmp_path / "s")
    writer._fh = real
    writer.close()


def test_torch_save_through_the_writer_is_digested(tmp_path):
    path = str(tmp_path / "t.pt")
    digests: dict = {}
    with ckpt._DigestingWriter(path, digests) as fh:
        torch.save({"w": torch.arange(10)}, fh)
    data = Path(path).read_bytes()
    assert digests[os.path.abspath(path)] == _digest(data)
    assert torch.equal(torch.load(path)["w"], torch.arange(10))


def test_describe_written_files(tmp_path):
    (tmp_path / "a").write_bytes(b"hello")
    (tmp_path / "b").write_bytes(b"")
    # read back (files other writers made)
    assert ckpt.describe_written_files(str(tmp_path), ["a", "b"]) == {
        "a": _digest(b"hello"), "b": _digest(b"")}
    # from the digests taken while writing (no read back: a wrong CRC is believed)
    digests = {str(tmp_path / "a"): {"size": 5, "crc32": 42}}
    assert ckpt.describe_written_files(str(tmp_path), ["a"], digests) == {
        "a": {"size": 5, "crc32": 42}}
    # a size on disk other than what was written is an I/O error naming the file
    digests = {str(tmp_path / "a"): {"size": 6, "crc32": 42}}
    with pytest.raises(OSError, match="5 bytes on disk, 6 written") as err:
        ckpt.describe_written_files(str(tmp_path), ["a"], digests)
    assert err.value.errno == errno.EIO and err.value.filename == str(tmp_path / "a")
    with pytest.raises(AssertionError, match="written without a digesting writer"):
        ckpt.describe_written_files(str(tmp_path), ["b"], digests)


# ------------------------------------------------------------------------------ manifests
def test_manifest_of(tmp_path):
    folder = _folder(tmp_path, "iter_3", FILES)
    manifest = ckpt.manifest_of(folder)
    assert manifest["step"] == 3 and manifest["files"] == {n: _digest(d) for n, d in FILES.items()}
    assert ckpt.manifest_of(str(tmp_path / "none")) is None
    (tmp_path / "iter_3" / ckpt.MANIFEST).write_text('{"files": ')  # cut short
    assert ckpt.manifest_of(folder) is None
    data = (tmp_path / "iter_3" / ckpt.MANIFEST).read_bytes()
    assert ckpt.manifest_crc(folder) == zlib.crc32(data)


def test_check_files_whole_missing_truncated_changed(tmp_path):
    folder = _folder(tmp_path, "iter_1", FILES)
    assert ckpt.check_files(folder) is None
    path = os.path.join(folder, "c.pt")
    _rewrite(path, b"d")  # same size, other bytes: only the checksum sees it
    assert ckpt.check_files(folder) == f"{path}: checksum differs from the manifest (damaged)"
    assert ckpt.check_files(folder, checksums=False) is None
    _rewrite(path, b"")
    assert ckpt.check_files(folder, checksums=False) == (
        f"{path}: 0 bytes, the manifest says 1 (truncated or damaged)")
    _rewrite(path, b"cc")  # longer is damaged too
    assert "2 bytes, the manifest says 1" in ckpt.check_files(folder)
    os.remove(path)
    assert ckpt.check_files(folder) == f"{path}: missing (the manifest lists it)"
    # a file the manifest does not list is not its business
    _rewrite(path, b"c")
    _rewrite(os.path.join(folder, "stray"), b"x")
    assert ckpt.check_files(folder) is None


def test_check_files_reports_the_first_problem_by_name(tmp_path):
    folder = _folder(tmp_path, "iter_1", FILES)
    for name in ("c.pt", "b.distcp", "meta.pt"):
        os.remove(os.path.join(folder, name))
    assert ckpt.check_files(folder) == f"{os.path.join(folder, 'b.distcp')}: missing (the manifest lists it)"


def test_check_files_only_the_names_given(tmp_path):
    folder = _folder(tmp_path, "iter_1", FILES)
    os.remove(os.path.join(folder, "c.pt"))
    assert ckpt.check_files(folder, names=["meta.pt", "b.distcp"]) is None
    assert ckpt.check_files(folder, names=[]) is None
    assert "c.pt: missing" in ckpt.check_files(folder, names=["c.pt"])


def test_check_files_without_a_manifest(tmp_path):
    old = _folder(tmp_path, "iter_1", {"meta.pt": b"m"}, manifest=False)
    assert ckpt.check_files(old) is None  # written before manifests: nothing to check against
    partial = _folder(tmp_path, "iter_2", {"c.pt": b"c"}, manifest=False)
    assert ckpt.check_files(partial) == f"{partial}: not a complete checkpoint (no {ckpt.MANIFEST})"
    assert not ckpt.is_checkpoint_dir(partial) and ckpt.is_checkpoint_dir(old)
    assert ckpt.is_checkpoint_dir(_folder(tmp_path, "iter_3", {"c.pt": b"c"}))


def test_verify_raises_the_problem_in_one_process(tmp_path):
    folder = _folder(tmp_path, "iter_1", FILES)
    ckpt.verify(folder)
    _rewrite(os.path.join(folder, "meta.pt"), b"meta-BYTES")
    ckpt.verify(folder, checksums=False)
    with pytest.raises(ckpt.CheckpointError, match=r"meta.pt: checksum differs"):
        ckpt.verify(folder)
    partial = _folder(tmp_path, "iter_2", {"c.pt": b"c"}, manifest=False)
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.verify(partial)


# ------------------------------------------------------------------------- newest complete
def test_newest_complete_and_resolve(tmp_path):
    _folder(tmp_path, "iter_9", FILES)
    ten = _folder(tmp_path, "iter_10", FILES)
    eleven = _folder(tmp_path, "iter_11", {"c.pt": b"c"}, manifest=False)  # never completed
    assert ckpt.newest_complete(str(tmp_path)) == ten  # by step: iter_10 after iter_9
    _rewrite(os.path.join(ten, "c.pt"), b"x")  # same size: sizes only, still complete
    assert ckpt.newest_complete(str(tmp_path)) == ten
    os.remove(os.path.join(ten, "c.pt"))
    assert ckpt.newest_complete(str(tmp_path)) == str(tmp_path / "iter_9")
    assert ckpt.resolve_checkpoint_dir(str(tmp_path)) == str(tmp_path / "iter_9")
    assert ckpt.resolve_checkpoint_dir(ten) == ten  # a checkpoint folder itself is taken as is
    del eleven
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ckpt.newest_complete(str(empty)) is None
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.resolve_checkpoint_dir(str(empty))
    assert str(err.value) == (
        f"TrainerArgs.ckpt_load_dir={str(empty)!r}: no complete checkpoint there (no iter_<step> "
        'folder with a manifest); use "auto" to start fresh when there is none')


# ---------------------------------------------------------------------------------- chains
def _chain(tmp_path, steps: list[int]) -> list[str]:
    """A full checkpoint at steps[0] and row deltas after it, each needing all before it."""
    folders: list[str] = []
    for i, step in enumerate(steps):
        files = dict(FILES)
        if i:
            files[f"{ckpt.ROWS_PREFIX}0.pt"] = b"rows%d" % step
        needs = {os.path.basename(f): ckpt.manifest_crc(f) for f in folders} if i else None
        folders.append(_folder(tmp_path, f"iter_{step}", files, needs))
    return folders


def test_a_chain_across_a_power_of_ten_is_read_in_step_order(tmp_path):
    """The manifest's keys are sorted as text (iter_100 before iter_90): the links, and the
    row deltas written on the tables, go by step."""
    folders = _chain(tmp_path, [80, 90, 100, 110])
    assert json.loads(Path(folders[-1], ckpt.MANIFEST).read_text())["needs"]
    assert ckpt.needed(folders[-1]) == folders[:-1]
    assert ckpt.table_links(folders[-1]) == (folders[0], folders[1:])
    assert ckpt.table_links(folders[2]) == (folders[0], folders[1:3])
    assert ckpt.table_links(folders[0]) is None  # whole tables
    assert ckpt.needed(folders[0]) == []
    assert ckpt.chain_problem(folders[-1]) is None


def test_the_saver_writes_a_chain_that_reads_back_in_order(tmp_path):
    """The same through save_checkpoint (one process): what a resume reads."""
    root, place, written = str(tmp_path), ckpt.RankPlace(), []
    for step in (8, 9, 10, 11):
        needs = {os.path.basename(f): ckpt.manifest_crc(f) for f in written} if written else None
        state = ckpt.CheckpointState({"t": {"w": torch.zeros(2)}}, {"d": step}, {"step": step},
                                     {"r": 0}, needs=needs,
                                     table_rows={"rows": step} if written else None)
        written.append(ckpt.save_checkpoint(root, step, state, place))
    base, deltas = ckpt.table_links(written[-1])
    assert (base, deltas) == (written[0], written[1:])
    assert [torch.load(r)["rows"] for d in deltas for r in ckpt.row_files(d)] == [9, 10, 11]
    assert ckpt.chain_problem(written[-1]) is None
    ckpt.verify(written[-1])


def test_a_need_that_is_not_a_checkpoint_name_is_refused(tmp_path):
    folder = _folder(tmp_path, "iter_5", FILES, needs={"base": 1})
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.needed(folder)
    assert str(err.value) == (
        f"{folder}/manifest.json: needs 'base', not an iter_<step> folder")


def test_chain_problems(tmp_path):
    folders = _chain(tmp_path, [1, 2, 3])
    last = folders[-1]
    # a link whose files are damaged (same size: the checksum sees it; sizes only: not)
    target = os.path.join(folders[1], "c.pt")
    _rewrite(target, b"z")
    assert ckpt.chain_problem(last) == (
        f"{target}: checksum differs from the manifest (damaged) (a link of the chain of {last})")
    assert ckpt.chain_problem(last, checksums=False) is None
    _rewrite(target, b"c")
    # a link saved again since (its manifest changed)
    manifest = os.path.join(folders[0], ckpt.MANIFEST)
    text = Path(manifest).read_text()
    _rewrite(manifest, text.replace('"world_size": 1', '"world_size": 2').encode())
    assert ckpt.chain_problem(last) == (
        f"{folders[0]}: not the checkpoint {last} was written on (saved again since; a link of "
        "its chain)")
    _rewrite(manifest, text.encode())
    assert ckpt.chain_problem(last) is None
    # a link gone
    os.remove(os.path.join(folders[1], ckpt.MANIFEST))
    assert ckpt.chain_problem(last) == (
        f"{folders[1]}: missing or incomplete (a link of the chain of {last})")
    # a folder without needs has no chain problem, whatever its own files
    assert ckpt.chain_problem(folders[0]) is None
    assert ckpt.chain_problem(str(tmp_path / "nowhere")) is None


def test_row_files_and_a_delta_without_whole_tables(tmp_path):
    rows = {f"{ckpt.ROWS_PREFIX}1.pt": b"r1", f"{ckpt.ROWS_PREFIX}0.pt": b"r0"}
    folder = _folder(tmp_path, "iter_4", {**FILES, **rows})
    assert ckpt.row_files(folder) == [os.path.join(folder, n) for n in sorted(rows)]
    assert ckpt.row_files(_folder(tmp_path, "iter_5", FILES)) == []
    assert ckpt.row_files(str(tmp_path / "gone")) == []
    with pytest.raises(ckpt.CheckpointError, match="iter_4: a row delta whose chain holds no whole"):
        ckpt.table_links(folder)


# ------------------------------------------------------------------------------------ pins
def test_pins_hold_a_folder_while_their_process_lives(tmp_path):
    folder = _folder(tmp_path, "iter_3", FILES)
    dead = tmp_path / f"iter_2{ckpt.PIN}999999999"  # no such process
    dead.write_text("")
    (tmp_path / f"iter_1{ckpt.PIN}abc").write_text("")  # not a pid: not a pin, left alone
    with ckpt.pin(folder + "/"):
        assert ckpt.pinned_folders(str(tmp_path)) == [folder]
        assert not dead.exists()  # a dead process's pin is removed
    assert ckpt.pinned_folders(str(tmp_path)) == []
    assert (tmp_path / f"iter_1{ckpt.PIN}abc").exists()
    assert sorted(os.listdir(tmp_path)) == ["iter_1.pin-abc", "iter_3"]
    # a folder whose own name holds the marker: the pid is what follows the last one
    odd = tmp_path / "odd.pin-x"
    odd.mkdir()
    with ckpt.pin(str(odd)):
        assert ckpt.pinned_folders(str(tmp_path)) == [str(odd)]


# ------------------------------------------------------------------- verify over two ranks
def _body_verify_shares(rank: int, world_size: int, folder: str, damaged: str) -> None:
    import torch.distributed as dist

    read: list[str] = []
    real = ckpt._crc32

    def spy(path, *a):
        read.append(os.path.basename(path))
        return real(path, *a)

    ckpt._crc32 = spy
    try:
        ckpt.verify(folder)  # whole: each file read by one rank
        everyone: list = [None] * world_size
        dist.all_gather_object(everyone, read)
        names = sorted(FILES)
        assert everyone == [names[r::world_size] for r in range(world_size)], everyone
        if rank == 0:  # same size, other bytes: only rank 1's checksum sees it
            _rewrite(os.path.join(folder, damaged), bytes(b ^ 1 for b in FILES[damaged]))
        dist.barrier()
        # the problem is the same line on every rank, naming the file and no rank
        with pytest.raises(ckpt.CheckpointError) as err:
            ckpt.verify(folder)
        assert str(err.value) == (
            f"{os.path.join(folder, damaged)}: checksum differs from the manifest (damaged)")
    finally:
        ckpt._crc32 = real


def test_verify_shares_the_files_among_the_ranks_and_names_no_rank(tmp_path):
    from tests.dist_utils import run_multiprocess

    folder = _folder(tmp_path, "iter_1", FILES)
    damaged = sorted(FILES)[1]  # rank 1's file
    run_multiprocess(_body_verify_shares, world_size=2, folder=folder, damaged=damaged)
