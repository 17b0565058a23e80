"""Checkpoint faults, reproduced for real on tiny `zagreus pretrain` runs (issue 15, points 1, 2 and 5).

- A damaged latest checkpoint (bytes overwritten, its .distcp cut short or deleted, .metadata
  deleted, meta.json cut short) is reported in one line, set aside as step-N.corrupt, and the
  run resumes from the previous checkpoint with losses bitwise equal to a run resumed from that
  checkpoint directly.
- `zagreus checkpoint verify` prints OK or what is damaged per checkpoint; exit 0 or 1.
- A full disk (a small tmpfs) during a save and a read-only run directory stop with one line
  naming the path, exit 2, and leave what was written intact, with no partial checkpoint behind.
- Under torchrun meta.json covers every rank's files, and a damaged one is set aside by rank 0
  while every rank resumes from the same intact checkpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_parallel_pretrain import data_dir, make_recipe  # noqa: F401  (data_dir is a module fixture)
from test_train_loop import _env, losses, pretrain
from zagreus.checkpoint import FILES, HASH, Verdict, latest_intact_checkpoint, load_checkpoint_model, verify_checkpoint
from zagreus.errors import UserError
from zagreus.rundir import list_checkpoints

STEPS = 8  # a checkpoint every 2 steps, the last 3 kept: step-4, step-6 and step-8


def recipe_for(data: Path, run: Path, steps: int = STEPS, **parallel) -> Path:
    path = make_recipe(data, run, steps=steps, **parallel)
    recipe = yaml.safe_load(path.read_text())
    recipe["pretrain"].update(checkpoint={"every": 2, "keep": 3}, peak_flops=1e12)  # no peak measurement: faster
    path.write_text(yaml.safe_dump(recipe))
    return path


def copy_run(run: Path, data: Path, to: Path) -> Path:
    """A copy of `run` at `to` (tokenizer/ and data/ stay symlinks); returns its recipe."""
    shutil.copytree(run, to, symlinks=True)
    return recipe_for(data, to)


def files(folder: Path) -> dict[str, bytes]:
    """Every file under folder (relative path -> bytes), symlinked folders not followed."""
    return {str(Path(top, name).relative_to(folder)): Path(top, name).read_bytes()
            for top, _, names in os.walk(folder) for name in names}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zagreus.cli", *args], env=_env(), capture_output=True, text=True,
                          timeout=300)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a failed command; no traceback anywhere."""
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def base(data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    done = pretrain(recipe_for(data_dir, run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(run)] == [4, 6, 8]
    return run


@pytest.fixture(scope="module")
def from_step_6(base, data_dir, tmp_path_factory) -> dict[int, float]:
    """The losses of the base run with step-8 removed, resumed from step-6 directly."""
    run = tmp_path_factory.mktemp("reference") / "run"
    recipe = copy_run(base, data_dir, run)
    shutil.rmtree(run / "checkpoints" / "step-000008")
    done = pretrain(recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step-000006'}" in done.stderr
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


def overwrite(checkpoint: Path) -> None:
    with open(checkpoint / "__0_0.distcp", "r+b") as f:
        f.seek(os.fstat(f.fileno()).st_size // 2)
        f.write(b"\xff" * 64)


def cut(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


# damage -> what the one-line report says about it
DAMAGES = {
    "distcp-overwritten": (overwrite, f"__0_0.distcp: {HASH} "),
    "distcp-truncated": (lambda c: cut(c / "__0_0.distcp"), "__0_0.distcp: "),
    "distcp-deleted": (lambda c: (c / "__0_0.distcp").unlink(), "__0_0.distcp: missing"),
    "metadata-deleted": (lambda c: (c / ".metadata").unlink(), ".metadata: missing"),
    "meta-json-truncated": (lambda c: cut(c / "meta.json"), "meta.json: unreadable"),
}


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(kind, base, from_step_6,
                                                                                     data_dir, tmp_path):
    run = tmp_path / "run"
    recipe = copy_run(base, data_dir, run)
    latest = run / "checkpoints" / "step-000008"
    damage, said = DAMAGES[kind]
    damage(latest)
    damaged = files(latest)
    done = pretrain(recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [line for line in done.stderr.splitlines() if "is damaged" in line]
    assert len(reports) == 1 and said in reports[0] and "set aside as step-000008.corrupt" in reports[0], reports
    assert f"resumed from {run / 'checkpoints' / 'step-000006'}" in done.stderr
    assert files(run / "checkpoints" / "step-000008.corrupt") == damaged  # set aside as it was, not deleted
    assert losses(run) == from_step_6
    assert verify_checkpoint(latest) == Verdict(None, True)  # step 8 trained again and saved whole


def test_checkpoint_without_checksums_loads_unverified(base, tmp_path, caplog):
    """Checkpoints saved before they carried checksums load as they did, with a line saying so."""
    shutil.copytree(base, tmp_path / "run", symlinks=True)
    root = tmp_path / "run" / "checkpoints"
    meta_path = root / "step-000008" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta[FILES]
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.INFO, logger="zagreus.checkpoint"):
        assert latest_intact_checkpoint(root) == root / "step-000008"
    assert "carries no checksums" in caplog.text and "loading it unverified" in caplog.text
    load_checkpoint_model(root / "step-000008")


def test_no_intact_checkpoint_left_is_one_error(base, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(base / "checkpoints", root)
    (root / "step-000008.corrupt").mkdir()  # set aside by an earlier fault
    for _, checkpoint in list_checkpoints(root):
        (checkpoint / ".metadata").unlink()
    with pytest.raises(UserError, match="every checkpoint is damaged"):
        latest_intact_checkpoint(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-000004.corrupt", "step-000006.corrupt",
                                                      "step-000008.corrupt", "step-000008.corrupt-2"]


def test_verify_command(base, tmp_path):
    intact = cli("checkpoint", "verify", str(base))
    assert intact.returncode == 0, intact.stderr[-3000:]
    assert intact.stdout.splitlines() == [f"checkpoints/step-00000{s}: OK" for s in (4, 6, 8)]

    run = tmp_path / "run"
    shutil.copytree(base, run, symlinks=True)
    overwrite(run / "checkpoints" / "step-000008")
    meta_path = run / "checkpoints" / "step-000004" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta[FILES]
    meta_path.write_text(json.dumps(meta))
    damaged = cli("checkpoint", "verify", str(run))
    assert damaged.returncode == 1, damaged.stderr[-3000:]
    lines = damaged.stdout.splitlines()
    assert lines[:2] == ["checkpoints/step-000004: OK (unverified: saved before checkpoints carried checksums)",
                         "checkpoints/step-000006: OK"]
    assert lines[2].startswith(f"checkpoints/step-000008: DAMAGED: __0_0.distcp: {HASH} ") and "bytes changed" in lines[2]
    assert len(lines) == 3 and "1 of 3 checkpoints damaged" in damaged.stderr

    one = cli("checkpoint", "verify", str(run / "checkpoints" / "step-000008"))
    assert one.returncode == 1 and one.stdout.count("DAMAGED") == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MB tmpfs of our own (we run as root); skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the full-disk and read-only faults need a tmpfs of their own")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs ({done.stderr.strip()}): the full-disk and read-only faults need one")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_full_disk_during_a_save(base, from_step_6, data_dir, small_disk):
    """The disk fills up while step-8 is saved: one line, exit 2, step-4 and step-6 untouched, no partial step-8."""
    run = small_disk / "run"
    recipe = copy_run(base, data_dir, run)
    shutil.rmtree(run / "checkpoints" / "step-000008")  # so the run trains steps 7-8, then saves step 8
    before = files(run / "checkpoints")
    checkpoint_bytes = sum(len(b) for name, b in before.items() if name.startswith("step-000006"))
    # Room for the metrics and TensorBoard records of steps 7-8, not for a checkpoint.
    with open(small_disk / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(small_disk).free - checkpoint_bytes // 4)
    done = pretrain(recipe)
    assert done.returncode == 2, done.stderr[-3000:]
    line = one_error_line(done)
    assert line.startswith(f"error: {run / 'checkpoints'}: no space left on device (ENOSPC); free space"), line
    assert files(run / "checkpoints") == before  # no .tmp-step-000008 left, the others byte for byte
    assert verify_checkpoint(run / "checkpoints" / "step-000006") == Verdict(None, True)
    assert losses(run) == from_step_6  # steps 7 and 8 were trained and logged before the save


def test_full_disk_seen_through_another_ranks_failure(small_disk, monkeypatch):
    """A rank whose own write went through learns of a full disk only from DCP's pickled
    "unexpected pos" RuntimeError of another rank, its OSError context lost: still ENOSPC, no partial folder."""
    import pickle

    from test_train_checkpoint import CFG, _trained

    import torch.distributed.checkpoint as dcp

    from zagreus import checkpoint

    model, optimizer = _trained(1)
    real_save = dcp.save

    def as_from_another_rank(*args, **kw):
        try:
            real_save(*args, **kw)
        except dcp.CheckpointException as exc:
            failure = exc
        else:
            pytest.fail("the save fit on the full disk")
        raise pickle.loads(pickle.dumps(failure))  # what gather_object and broadcast_object deliver, no context

    monkeypatch.setattr(dcp, "save", as_from_another_rank)
    with open(small_disk / "filler", "wb") as f:  # room for a few KB, not for the model
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(small_disk).free - (64 << 10))
    with pytest.raises(OSError) as raised:
        checkpoint.save_checkpoint(small_disk / "checkpoints", 1, model, optimizer, {"model_config": CFG.model_dump()})
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(small_disk / "checkpoints")
    assert isinstance(raised.value.__cause__, dcp.CheckpointException)
    assert list((small_disk / "checkpoints").iterdir()) == []


def test_read_only_run_directory(base, data_dir, small_disk):
    run = small_disk / "run"
    recipe = copy_run(base, data_dir, run)
    shutil.rmtree(run / "checkpoints" / "step-000008")
    before = files(run)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    done = pretrain(recipe)
    assert done.returncode == 2, done.stderr[-3000:]
    line = one_error_line(done)
    assert line.startswith(f"error: {run / 'recipe.yaml'}: read-only file system (EROFS); remount it read-write"), line
    assert files(run) == before
    assert verify_checkpoint(run / "checkpoints" / "step-000006") == Verdict(None, True)


def torchrun(recipe: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "zagreus.cli", "pretrain", str(recipe)], env=_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def dp2(data_dir, tmp_path_factory) -> Path:
    """4 steps under torchrun, dp=2 (FSDP2): step-2 and step-4, each rank with its own shard and RNG file."""
    run = tmp_path_factory.mktemp("dp2") / "run"
    done = torchrun(recipe_for(data_dir, run, steps=4, dp_shard=2))
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def test_every_rank_is_covered_under_torchrun(dp2, data_dir, tmp_path):
    """meta.json holds both ranks' shards and RNG files; a damaged shard of rank 1 is found and set
    aside, and both ranks resume from the previous checkpoint to the same losses."""
    run = tmp_path / "run"
    shutil.copytree(dp2, run, symlinks=True)
    recipe = recipe_for(data_dir, run, steps=4, dp_shard=2)
    latest = run / "checkpoints" / "step-000004"
    recorded = json.loads((latest / "meta.json").read_text())[FILES]
    assert set(recorded) == {".metadata", "__0_0.distcp", "__1_0.distcp", "rank-0.pt", "rank-1.pt"}
    assert verify_checkpoint(latest) == Verdict(None, True)

    with open(latest / "__1_0.distcp", "r+b") as f:
        f.seek(recorded["__1_0.distcp"]["size"] // 2)
        f.write(b"\xff" * 64)
    done = torchrun(recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [line for line in done.stderr.splitlines() if "is damaged" in line]
    assert len(reports) == 1 and f"__1_0.distcp: {HASH} " in reports[0], reports
    assert done.stderr.count(f"resumed from {run / 'checkpoints' / 'step-000002'}") == 2  # both ranks
    assert (run / "checkpoints" / "step-000004.corrupt").is_dir()
    assert losses(run) == losses(dp2)


def test_full_disk_under_torchrun(dp2, data_dir, small_disk):
    """Both ranks' writes fail and DCP hands each rank every rank's failure: both say so in one line;
    step-4 stays whole, no partial step-6."""
    run = small_disk / "run"
    shutil.copytree(dp2, run, symlinks=True)
    recipe = recipe_for(data_dir, run, steps=6, dp_shard=2)  # constant lr: 2 more steps, then step-6 is saved
    before = files(run / "checkpoints")
    checkpoint_bytes = sum(len(b) for name, b in before.items() if name.startswith("step-000004"))
    with open(small_disk / "filler", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(small_disk).free - checkpoint_bytes // 4)
    done = torchrun(recipe)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {run / 'checkpoints'}: no space left on device (ENOSPC); free space on that disk or "
                      f"move the run to a larger one, then run the same command again"] * 2, done.stderr[-3000:]
    assert files(run / "checkpoints") == before
    assert verify_checkpoint(run / "checkpoints" / "step-000004") == Verdict(None, True)
