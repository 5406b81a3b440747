"""The torch-free checkpoint store: manifests, atomic writes, ``latest``, rank markers,
verification, fallback and retention. Real files in tmp_path; torch only for HashingFile."""

from __future__ import annotations

import json
import os
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pretrain_trainer.ckpt import (
    Checkpoint,
    CheckpointError,
    FileRecord,
    HashingFile,
    Manifest,
    checkpoint_dir,
    clean_incomplete,
    collect_rank_markers,
    config_hash,
    crc32_file,
    incomplete,
    list_checkpoints,
    newest_valid,
    prune,
    read_latest,
    read_manifest,
    remove_rank_markers,
    retention,
    set_latest,
    utc_now,
    verify,
    write_json_atomic,
    write_manifest,
    write_rank_marker,
)

FILES = {"model_states.pt": b"weights" * 1000, "zero/optim_rank0.pt": bytes(range(256)) * 64}


def _manifest(
    stage: int, step: int, *, final: bool = False, files: Any = (), **extra: Any
) -> Manifest:
    fields: dict[str, Any] = {
        "job": "demo",
        "stage": stage,
        "stageName": f"s{stage}",
        "step": step,
        "tokens": step * 1024,
        "worldSize": 2,
        "zeroStage": 1,
        "configHash": config_hash({"stage": stage}),
        "final": final,
        "savedAt": utc_now(),
        "sampler": {"consumed": {"web": step * 8}},
        "files": list(files),
    }
    return Manifest.model_validate({**fields, **extra})


def _save(root: Path, stage: int, step: int, *, final: bool = False) -> Path:
    """A complete checkpoint written the way the engine does: files, then the manifest."""
    directory = checkpoint_dir(root, stage=stage, step=step)
    records = []
    for name, payload in FILES.items():
        with HashingFile(directory / name) as f:
            f.write(payload + f"{stage}/{step}".encode())
        records.append(f.record(directory))
    write_manifest(directory, _manifest(stage, step, final=final, files=records))
    return directory


def _temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


# --- manifests -------------------------------------------------------------------------------


def test_manifest_round_trips_through_camel_case_json(tmp_path: Path) -> None:
    directory = _save(tmp_path, 1, 40, final=True)
    raw = json.loads((directory / "manifest.json").read_text())
    assert {"stageName", "worldSize", "zeroStage", "configHash", "savedAt"} <= set(raw)
    manifest = read_manifest(directory)
    assert manifest == _manifest(1, 40, final=True, files=manifest.files, savedAt=raw["savedAt"])
    assert [f.path for f in manifest.files] == sorted(FILES)
    assert manifest.total_bytes == sum(len(p) + len(b"1/40") for p in FILES.values())
    assert manifest.saved_at.endswith("Z")


def _valid_raw() -> dict[str, Any]:
    return _manifest(0, 5, files=[FileRecord(path="a.pt", size=1, crc32=2)]).model_dump(
        mode="json", by_alias=True
    )


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "no manifest.json"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "invalid manifest.json"),
        ({"unknown": 1}, "unknown: Extra inputs are not permitted"),
        ({"step": -1}, "step: Input should be greater than or equal to 0"),
        ({"version": 2}, "manifest version 2 is not 1"),
        ({"files": [{"path": "../x.pt", "size": 1, "crc32": 0}]}, "not a normalised relative"),
        ({"files": [{"path": "/etc/passwd", "size": 1, "crc32": 0}]}, "not a normalised relative"),
        (
            {"files": [{"path": "a.pt", "size": 1, "crc32": 0}] * 2},
            "files lists a path twice",
        ),
        ({"final": "yes"}, "final: Input should be a valid boolean"),
    ],
)
def test_read_manifest_names_the_directory_and_why(tmp_path: Path, content: Any, why: str) -> None:
    if isinstance(content, dict):
        content = json.dumps({**_valid_raw(), **content}).encode()
    if content is not None:
        (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        read_manifest(tmp_path)
    assert str(tmp_path) in str(caught.value)
    assert why in str(caught.value)


def test_config_hash_is_canonical() -> None:
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    record = FileRecord(path="x", size=1, crc32=2)
    assert config_hash(record) == config_hash({"crc32": 2, "path": "x", "size": 1})
    assert len(config_hash([])) == 64


# --- atomic writes and latest ----------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_json_atomic(target, {"n": 1})
    write_json_atomic(target, {"n": 2})
    assert json.loads(target.read_text()) == {"n": 2}
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_write_failing_before_rename_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    write_json_atomic(target, {"n": 1})

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_json_atomic(target, {"n": 2})
    assert json.loads(target.read_text()) == {"n": 1}
    assert _temp_files(tmp_path) == []


def test_leftover_temp_files_of_a_crashed_writer_are_ignored(tmp_path: Path) -> None:
    good = _save(tmp_path, 0, 10)
    (good / ".manifest.json.k3j2.tmp").write_text('{"half": ')  # a later rewrite that crashed
    torn = checkpoint_dir(tmp_path, stage=0, step=20)
    torn.mkdir(parents=True)
    (torn / "model_states.pt").write_bytes(b"partial")
    (torn / ".manifest.json.x9a1.tmp").write_text('{"job": "de')  # crashed before the rename
    (tmp_path / ".latest.q1w2.tmp").write_text("stage-0/st")

    assert [c.directory for c in list_checkpoints(tmp_path)] == [good]
    assert incomplete(tmp_path) == [torn]
    assert verify(good, read_manifest(good)).ok
    assert [r.path for r in read_manifest(good).files] == sorted(FILES)
    assert read_latest(tmp_path) is None
    removed = clean_incomplete(tmp_path)
    assert set(removed) == {torn, tmp_path / ".latest.q1w2.tmp"}
    assert not torn.exists()
    assert good.exists()


def test_latest_points_at_the_newest_checkpoint_by_relative_path(tmp_path: Path) -> None:
    assert read_latest(tmp_path) is None
    first, second = _save(tmp_path, 0, 10), _save(tmp_path, 1, 40)
    set_latest(tmp_path, to=first)
    set_latest(tmp_path, to=second)
    assert (tmp_path / "latest").read_text().strip() == "stage-1/step-40"
    assert read_latest(tmp_path) == second
    assert _temp_files(tmp_path) == []


@pytest.mark.parametrize("text", ["stage-9/step-1", "", "../outside", "/etc"])
def test_read_latest_ignores_a_dangling_or_escaping_pointer(tmp_path: Path, text: str) -> None:
    (tmp_path / "outside").mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "latest").write_text(text)
    assert read_latest(root) is None


def test_set_latest_refuses_a_directory_outside_the_root(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    with pytest.raises(CheckpointError, match="not under checkpoint root"):
        set_latest(tmp_path / "root", to=tmp_path)


# --- rank markers ----------------------------------------------------------------------------


def _records(*names: str) -> list[FileRecord]:
    return [FileRecord(path=n, size=len(n), crc32=zlib.crc32(n.encode())) for n in names]


def test_collect_waits_for_a_late_rank_and_merges_sorted(tmp_path: Path) -> None:
    write_rank_marker(tmp_path, rank=0, files=_records("r0/b.pt", "shared.pt"))
    late = threading.Timer(
        0.2, write_rank_marker, args=(tmp_path,), kwargs={"rank": 1, "files": _records("a.pt")}
    )
    late.start()
    started = time.monotonic()
    files = collect_rank_markers(tmp_path, world_size=2, timeout=5, poll=0.01)
    late.join()
    assert time.monotonic() - started >= 0.15
    assert [f.path for f in files] == ["a.pt", "r0/b.pt", "shared.pt"]
    remove_rank_markers(tmp_path)
    assert os.listdir(tmp_path) == []


def test_collect_timeout_names_the_missing_ranks(tmp_path: Path) -> None:
    write_rank_marker(tmp_path, rank=1, files=[])
    with pytest.raises(CheckpointError, match=r"rank\(s\) 0, 2 wrote no marker within 0.1s"):
        collect_rank_markers(tmp_path, world_size=3, timeout=0.1, poll=0.01)


def test_collect_refuses_ranks_that_disagree_about_a_file(tmp_path: Path) -> None:
    write_rank_marker(tmp_path, rank=0, files=[FileRecord(path="x", size=1, crc32=1)])
    write_rank_marker(tmp_path, rank=1, files=[FileRecord(path="x", size=1, crc32=2)])
    with pytest.raises(CheckpointError, match="ranks disagree about x"):
        collect_rank_markers(tmp_path, world_size=2, timeout=1)


# --- verify and fallback ---------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_truncate, "zero/optim_rank0.pt: size 16386 != 16387 (truncated or wrong)"),
        (_flip, "zero/optim_rank0.pt: crc32 mismatch"),
        (Path.unlink, "zero/optim_rank0.pt: missing"),
    ],
)
def test_verify_detects_damage_and_names_the_file(
    tmp_path: Path, damage: Any, problem: str
) -> None:
    directory = _save(tmp_path, 0, 7)
    damage(directory / "zero/optim_rank0.pt")
    result = verify(directory, read_manifest(directory))
    assert not result.ok
    assert len(result.problems) == 1
    assert result.problems[0].startswith(problem)


def test_verify_passes_a_good_checkpoint_and_counts_bytes(tmp_path: Path) -> None:
    directory = _save(tmp_path, 0, 7)
    (directory / "universal").mkdir()
    (directory / "universal" / "extra.pt").write_bytes(b"converted later")  # extras allowed
    manifest = read_manifest(directory)
    for workers in (1, 4):
        result = verify(directory, manifest, workers=workers)
        assert result.ok, result.problems
        assert result.problems == []
        assert result.bytes_read == manifest.total_bytes
        assert result.seconds >= 0


def test_verify_without_checksums_only_checks_sizes(tmp_path: Path) -> None:
    directory = _save(tmp_path, 0, 7)
    _flip(directory / "model_states.pt")
    result = verify(directory, read_manifest(directory), checksums=False)
    assert (result.ok, result.bytes_read) == (True, 0)


def test_newest_valid_falls_back_past_a_corrupt_checkpoint_and_says_why(tmp_path: Path) -> None:
    older = _save(tmp_path, 0, 20)
    newest = _save(tmp_path, 0, 40)
    _flip(newest / "model_states.pt")
    lines: list[str] = []
    found = newest_valid(tmp_path, log=lines.append)
    assert found is not None
    checkpoint, result = found
    assert checkpoint.directory == older
    assert (checkpoint.stage, checkpoint.step) == (0, 20)
    assert result.ok
    assert len(lines) == 1
    assert lines[0].startswith("skipping stage-0/step-40: model_states.pt: crc32 mismatch")


def test_newest_valid_filters_by_stage_and_final(tmp_path: Path) -> None:
    _save(tmp_path, 0, 10)
    final0 = _save(tmp_path, 0, 20, final=True)
    _save(tmp_path, 0, 30)  # a later non-final save must not shadow the final one
    newest1 = _save(tmp_path, 1, 5)

    def pick(**filters: Any) -> Path | None:
        found = newest_valid(tmp_path, log=pytest.fail, **filters)
        return None if found is None else found[0].directory

    assert pick() == newest1
    assert pick(stage=1) == newest1
    assert pick(stage=0, final=True) == final0
    assert pick(stage=1, final=True) is None
    assert pick(stage=2) is None


def test_a_directory_without_manifest_does_not_exist(tmp_path: Path) -> None:
    complete = _save(tmp_path, 0, 10)
    unfinished = checkpoint_dir(tmp_path, stage=0, step=20)
    unfinished.mkdir()
    (unfinished / "model_states.pt").write_bytes(b"half")
    renamed = checkpoint_dir(tmp_path, stage=0, step=30)  # a manifest for another step
    renamed.parent.mkdir(exist_ok=True)
    os.rename(_save(tmp_path, 0, 99), renamed)
    (tmp_path / "stage-0" / "step-x").mkdir()  # not ours: ignored, never removed
    (tmp_path / "stage-0" / "step-007").mkdir()

    assert [c.directory for c in list_checkpoints(tmp_path)] == [complete]
    assert incomplete(tmp_path) == [renamed, unfinished]
    found = newest_valid(tmp_path, log=pytest.fail)
    assert found is not None
    assert found[0].directory == complete
    assert clean_incomplete(tmp_path) == [renamed, unfinished]
    assert sorted(p.name for p in (tmp_path / "stage-0").iterdir()) == [
        "step-007",
        "step-10",
        "step-x",
    ]


def test_list_checkpoints_orders_by_stage_then_step_numerically(tmp_path: Path) -> None:
    for stage, step in [(0, 9), (0, 100), (1, 2), (0, 20)]:
        _save(tmp_path, stage, step)
    assert [c.name for c in list_checkpoints(tmp_path)] == [
        "stage-1/step-2",
        "stage-0/step-100",
        "stage-0/step-20",
        "stage-0/step-9",
    ]


def test_reading_a_file_back_gives_the_checksum_recorded_while_writing_it(
    tmp_path: Path,
) -> None:
    directory = _save(tmp_path, 0, 3)
    records = read_manifest(directory).files
    assert [r.path for r in records] == sorted(FILES)
    for record in records:
        crc, size = crc32_file(directory / record.path)
        assert FileRecord(path=record.path, size=size, crc32=crc) == record


# --- retention -------------------------------------------------------------------------------


def _checkpoint(stage: int, step: int, final: bool) -> Checkpoint:
    return Checkpoint(
        directory=Path(f"/ckpt/stage-{stage}/step-{step}"),
        stage=stage,
        step=step,
        manifest=_manifest(stage, step, final=final),
    )


@pytest.mark.parametrize(
    ("saved", "keep", "deleted"),
    [
        ([(0, 10, False), (0, 20, False), (0, 30, False)], 2, [(0, 10)]),
        ([(0, 10, False), (0, 20, True), (1, 5, False), (1, 10, False)], 1, [(1, 5), (0, 10)]),
        ([(0, 10, True), (1, 5, True)], 1, []),
        ([(0, 10, False)], 0, [(0, 10)]),
        ([], 3, []),
    ],
)
def test_retention_keeps_the_last_k_and_every_final(
    saved: list[tuple[int, int, bool]], keep: int, deleted: list[tuple[int, int]]
) -> None:
    doomed = retention([_checkpoint(*s) for s in saved], keep=keep)
    assert [(c.stage, c.step) for c in doomed] == deleted


@settings(max_examples=60, deadline=None)
@given(
    saved=st.dictionaries(
        st.tuples(st.integers(0, 3), st.integers(0, 50)), st.booleans(), max_size=15
    ),
    keep=st.integers(0, 6),
)
def test_retention_property(saved: dict[tuple[int, int], bool], keep: int) -> None:
    checkpoints = [_checkpoint(stage, step, final) for (stage, step), final in saved.items()]
    doomed = {(c.stage, c.step) for c in retention(checkpoints, keep=keep)}
    newest = set(sorted(saved, reverse=True)[:keep])
    finals = {key for key, final in saved.items() if final}
    assert not doomed & finals
    assert not doomed & newest
    assert doomed == set(saved) - finals - newest


def test_retention_rejects_a_negative_keep() -> None:
    with pytest.raises(ValueError, match="keep must be >= 0"):
        retention([], keep=-1)


def test_prune_applies_retention_but_never_deletes_latest(tmp_path: Path) -> None:
    old = _save(tmp_path, 0, 10)
    final = _save(tmp_path, 0, 20, final=True)
    middle = _save(tmp_path, 1, 5)
    newest = _save(tmp_path, 1, 10)
    unfinished = checkpoint_dir(tmp_path, stage=1, step=15)  # a save in flight
    unfinished.mkdir()
    set_latest(tmp_path, to=middle)  # e.g. restored from it after the newest failed to verify

    assert prune(tmp_path, keep=1) == [old]
    assert [c.directory for c in list_checkpoints(tmp_path)] == [newest, middle, final]
    assert unfinished.is_dir()
    set_latest(tmp_path, to=newest)
    assert prune(tmp_path, keep=1) == [middle]
    assert read_latest(tmp_path) == newest


# --- HashingFile -----------------------------------------------------------------------------


def test_hashing_file_under_torch_save_records_the_file_it_wrote(tmp_path: Path) -> None:
    state: dict[str, Any] = {
        "weight": torch.randn(64, 33),
        "bias": torch.arange(17, dtype=torch.bfloat16),
        "step": 40,
        "nested": {"ids": torch.randint(0, 1000, (5, 7))},
    }
    directory = tmp_path / "stage-0" / "step-40"
    with HashingFile(directory / "zero" / "rank-0.pt") as f:
        assert (f.writable(), f.seekable(), f.readable()) == (True, False, False)
        assert (f.name, f.mode) == (str(directory / "zero" / "rank-0.pt"), "wb")
        torch.save(state, f)
    record = f.record(relative_to=directory)
    data = (directory / "zero" / "rank-0.pt").read_bytes()
    assert record == FileRecord(path="zero/rank-0.pt", size=len(data), crc32=zlib.crc32(data))

    loaded = torch.load(directory / "zero" / "rank-0.pt", mmap=True, weights_only=True)
    assert loaded["step"] == 40
    for key in ("weight", "bias"):
        assert torch.equal(loaded[key], state[key])
    assert torch.equal(loaded["nested"]["ids"], state["nested"]["ids"])


def test_hashing_file_refuses_a_record_before_close_and_writes_after(tmp_path: Path) -> None:
    f = HashingFile(tmp_path / "x.bin")
    assert f.write(memoryview(b"abc")) == 3
    assert f.write(bytearray(b"de")) == 2
    with pytest.raises(ValueError, match="before close"):
        f.record(tmp_path)
    f.close()
    f.close()  # idempotent
    assert f.record(tmp_path) == FileRecord(path="x.bin", size=5, crc32=zlib.crc32(b"abcde"))
    with pytest.raises(ValueError, match="closed"):
        f.write(b"more")


def test_pretrainctl_checkpoints_lists_and_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pretrain_operator.cli import main

    older = _save(tmp_path, 0, 10, final=True)
    newer = _save(tmp_path, 1, 20)
    set_latest(tmp_path, to=newer)
    (tmp_path / "stage-1" / "step-30").mkdir()
    assert main(["checkpoints", str(tmp_path), "--verify"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("stage-1/step-20")
    assert lines[0].endswith("<- latest  ok")
    assert "final" in lines[1]
    assert lines[2] == "stage-1/step-30          incomplete (no manifest)"
    _flip(older / "model_states.pt")
    assert main(["checkpoints", str(tmp_path), "--verify"]) == 2
    assert "CORRUPT: model_states.pt: crc32 mismatch" in capsys.readouterr().out
