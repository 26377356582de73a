"""The checkpoint folder's layout (orchestrator.core.checkpoints), and the Checkpointer's retention and fallback on a
one-process group: what the end-to-end resume tests rely on, checked in isolation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import xxhash

from orchestrator.core import checkpoints


def digest(payload: bytes) -> checkpoints.CheckpointFile:
    return checkpoints.entry_of(payload)


def committed(root: Path, step: int, payload: bytes = b"weights") -> Path:
    """A committed checkpoint of one file, made through the layout's own commit."""
    partial = checkpoints.partial_dir(root, step)
    partial.mkdir(parents=True)
    (partial / "shard.distcp").write_bytes(payload)
    return checkpoints.commit(root, partial, step, {"shard.distcp": digest(payload)})


def test_a_commit_names_the_folder_in_latest_and_its_manifest_matches(tmp_path: Path) -> None:
    folder = committed(tmp_path, 20)
    assert folder == tmp_path / "step_00000020"
    assert checkpoints.committed_steps(tmp_path) == [20]
    assert checkpoints.read_latest(tmp_path) == checkpoints.Latest(step=20, dir="step_00000020")
    assert checkpoints.damage(folder) is None
    assert not checkpoints.partial_dir(tmp_path, 20).exists()


def test_a_commit_refuses_files_its_writers_did_not_hash_or_hashed_at_another_size(tmp_path: Path) -> None:
    partial = checkpoints.partial_dir(tmp_path, 10)
    partial.mkdir()
    (partial / "shard.distcp").write_bytes(b"weights")
    (partial / "stray.bin").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="stray.bin was written but not hashed"):
        checkpoints.commit(tmp_path, partial, 10, {"shard.distcp": digest(b"weights")})
    (partial / "stray.bin").unlink()
    with pytest.raises(RuntimeError, match="manifest says 6"):
        checkpoints.commit(tmp_path, partial, 10, {"shard.distcp": digest(b"weight")})
    assert checkpoints.committed_steps(tmp_path) == []


def test_a_manifest_of_sha256_digests_still_loads_and_finds_a_changed_byte(tmp_path: Path) -> None:
    """Checkpoints written before XXH3 list a SHA-256 per file."""
    folder = tmp_path / "step_00000010"
    folder.mkdir()
    (folder / "shard.distcp").write_bytes(b"weights")
    entry = {"bytes": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}
    (folder / "COMMITTED.json").write_text(json.dumps({"step": 10, "files": {"shard.distcp": entry}}))
    assert checkpoints.damage(folder) is None
    assert checkpoints.committed_steps(tmp_path) == [10]
    (folder / "shard.distcp").write_bytes(b"weighTs")
    assert checkpoints.damage(folder) == "shard.distcp fails its SHA-256 checksum"


def test_a_new_manifest_names_xxh3_128_for_each_file(tmp_path: Path) -> None:
    folder = committed(tmp_path, 10)
    written = json.loads((folder / "COMMITTED.json").read_text())
    assert written["files"] == {"shard.distcp": {"bytes": 7, "xxh3_128": xxhash.xxh3_128(b"weights").hexdigest()}}


@pytest.mark.parametrize(
    ("harm", "said"),
    [
        (lambda f: (f / "COMMITTED.json").write_text('"a string"'), "unreadable commit marker"),
        (lambda f: (f / "COMMITTED.json").write_text('{"step": 1, "files": {"x": 5}}'), "unreadable commit marker"),
        (
            lambda f: (f / "COMMITTED.json").write_text('{"step": 1, "files": {"x": {"bytes": 5}}}'),
            "exactly one digest",
        ),
        (lambda f: (f / "shard.distcp").unlink(), "shard.distcp is missing"),
        (lambda f: (f / "shard.distcp").write_bytes(b"weight"), "manifest says 7"),
        (lambda f: (f / "shard.distcp").write_bytes(b"WEIGHTS"), "fails its XXH3-128 checksum"),
    ],
)
def test_damage_names_what_is_wrong_with_a_committed_checkpoint(tmp_path: Path, harm, said: str) -> None:
    folder = committed(tmp_path, 10)
    harm(folder)
    assert said in checkpoints.damage(folder)


def test_a_checksum_change_of_the_same_size_passes_without_checksums(tmp_path: Path) -> None:
    folder = committed(tmp_path, 10)
    (folder / "shard.distcp").write_bytes(b"WEIGHTS")
    assert checkpoints.damage(folder, checksums=False) is None


def test_setting_aside_the_same_step_twice_keeps_both_folders(tmp_path: Path) -> None:
    committed(tmp_path, 30)
    first = checkpoints.set_aside(tmp_path, 30, "damaged")
    committed(tmp_path, 30)
    second = checkpoints.set_aside(tmp_path, 30, "damaged")
    assert (first.name, second.name) == ("damaged_step_00000030", "damaged_step_00000030.2")
    assert checkpoints.committed_steps(tmp_path) == []


def test_lost_files_tells_a_deleted_checkpoint_from_a_damaged_one(tmp_path: Path) -> None:
    folder = committed(tmp_path, 10)
    assert not checkpoints.lost_files(folder)
    (folder / "COMMITTED.json").write_text("[]")
    assert not checkpoints.lost_files(folder)  # a marker that is there but unreadable: damage
    (folder / "COMMITTED.json").unlink()
    assert checkpoints.lost_files(folder)


def test_committed_step_falls_back_to_the_newest_folder_when_latest_is_damaged(tmp_path: Path) -> None:
    committed(tmp_path, 10)
    committed(tmp_path, 20)
    (tmp_path / "latest.json").write_text("{not json")
    assert checkpoints.committed_step(tmp_path) == 20
    checkpoints.forget_latest(tmp_path)
    assert checkpoints.committed_step(tmp_path) == 20


def test_incomplete_dirs_are_partial_saves_and_step_folders_without_a_marker(tmp_path: Path) -> None:
    committed(tmp_path, 10)
    checkpoints.partial_dir(tmp_path, 20).mkdir()
    (tmp_path / "step_00000030").mkdir()
    assert sorted(p.name for p in checkpoints.incomplete_dirs(tmp_path)) == [".step_00000020.partial", "step_00000030"]


def test_a_damaged_protected_list_protects_nothing_and_is_rewritten_whole(tmp_path: Path) -> None:
    (tmp_path / "protected.json").write_text('"nonsense"')
    assert checkpoints.read_protected(tmp_path) == {}
    checkpoints.protect(tmp_path, 40, "the last good checkpoint")
    assert json.loads((tmp_path / "protected.json").read_text()) == {"40": "the last good checkpoint"}


@pytest.fixture
def one_process_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(__import__("tests.conftest").conftest.free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_checkpointer_keeps_the_newest_milestones_and_protected_and_falls_back_past_damage(
    tmp_path: Path, one_process_group: None
) -> None:
    import torch

    from jobs.checkpoint import Checkpointer
    from orchestrator.core.config import CheckpointSpec

    spec = CheckpointSpec(every_steps=1, keep_last=2, keep_every=4, async_save=False)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = Checkpointer(tmp_path, spec)
    for step in range(1, 7):
        if step == 2:
            saver.protect(2, "kept by hand")
        saver.save(step, model, optimizer, {"weights_at": step})
    saver.wait()  # retention deletes in the background
    assert checkpoints.committed_steps(tmp_path) == [6, 5, 4, 2]

    shard = next(checkpoints.step_dir(tmp_path, 6).glob("*.distcp"))
    shard.write_bytes(b"\0" * shard.stat().st_size)
    step, problems = saver.choose()
    assert step == 5 and "step 6 is damaged" in problems[0]
    assert checkpoints.read_latest(tmp_path).step == 5  # no longer the folder set aside
    assert saver.load(5, model, optimizer)["weights_at"] == 5
    saver.close()


@pytest.mark.parametrize("async_save", [False, True])
def test_the_manifest_holds_the_digest_of_every_file_as_written_and_a_flipped_byte_is_found_on_load(
    tmp_path: Path, one_process_group: None, async_save: bool
) -> None:
    import torch

    from jobs.checkpoint import Checkpointer
    from orchestrator.core.config import CheckpointSpec

    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = Checkpointer(tmp_path, CheckpointSpec(every_steps=1, async_save=async_save))
    assert saver.save_seconds() is None
    for step in (1, 2):
        saver.save(step, model, optimizer, {"weights_at": step})
    saver.wait()
    assert saver.save_seconds() > 0

    folder = checkpoints.step_dir(tmp_path, 2)
    marker = checkpoints.read_commit_marker(folder)
    on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != "COMMITTED.json")
    assert sorted(marker.files) == on_disk and {".metadata", "train_state.json", "rng_rank0.pt"} <= set(on_disk)
    for name, entry in marker.files.items():
        content = (folder / name).read_bytes()
        assert (entry.bytes, entry.xxh3_128) == (len(content), xxhash.xxh3_128(content).hexdigest())

    shard = next(folder.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    step, problems = saver.choose()
    assert step == 1 and problems == [f"checkpoint at step 2 is damaged: {shard.name} fails its XXH3-128 checksum"]
    saver.close()


@pytest.mark.parametrize("direct", [True, False])
def test_a_hashing_file_writes_every_byte_in_order_whole_buffers_and_tail_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    import errno
    import os

    import jobs.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 8192)  # a few whole buffers, then a tail of no whole block
    if not direct:  # a file system that refuses O_DIRECT (tmpfs) gets the same file through the page cache
        real_open = os.open

        def refusing(path, flags, mode=0o777):
            if flags & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, mode)

        monkeypatch.setattr(checkpoint.os, "open", refusing)
    payload = os.urandom(5 * 8192 + 1000)
    hashing = checkpoint.HashingFile(tmp_path / "shard.distcp")
    for start in range(0, len(payload), 3000):  # pieces that straddle the buffers' edges
        hashing.write(memoryview(payload)[start : start + 3000])
    assert hashing.tell() == len(payload)
    hashing.close()
    hashing.close()  # torch closes the stream itself; the file system closes it again

    assert (tmp_path / "shard.distcp").read_bytes() == payload
    assert hashing.entry() == checkpoints.entry_of(payload)
    assert hashing.direct == direct


def test_a_failed_write_to_the_disk_fails_the_file_and_frees_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import jobs.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 8192)

    def full(fd: int, data: memoryview) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_all", full)
    files = checkpoint.HashingFileSystem()
    with pytest.raises(OSError, match="No space left"):
        with files.create_stream(tmp_path / "shard.distcp", "wb") as stream:
            stream.write(b"\0" * 3 * 8192)
    assert stream.closed and files.written == {}
