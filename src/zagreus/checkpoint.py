"""Checkpoints: saving and loading training state, and opening any saved model for use.

Training checkpoints are torch.distributed.checkpoint folders with a meta.json, kept atomically.

A checkpoint is `<root>/step-000100/`: DCP files holding {"model", "optim"} (built with
torch.distributed.checkpoint.state_dict, so the same code saves a plain model, FSDP2 or TP
DTensors, and loads under another layout), one `rank-N.pt` per rank with its RNG state, and
meta.json (step, tokens seen in total and per source, data-loader state, recipe, model config,
tokenizer folder, code version). Everything is written under `.tmp-step-000100` and renamed;
meta.json is written last inside it, so a folder named step-N with a meta.json is complete and
a crash during a save never touches the checkpoints already there. meta.json records the size and
xxh3-128 hash of every other file (every rank's), so `verify_checkpoint` finds flipped bytes, cut
or missing files; on resume a damaged latest checkpoint is set aside as step-N.corrupt and the
newest intact one loads. A save that fails for want of disk space (or on a read-only, forbidden
or failing disk) removes its partial folder and raises an OSError naming the path, which the CLI
prints as one line. Where checkpoints sit in a run directory is zagreus.rundir's business.

`load_model_and_tokenizer(path)` opens an export folder, a checkpoint or a run directory's latest
checkpoint: what eval, serve, release and post-training start from. It lives below all of them.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import xxhash
from torch import nn

import zagreus
from zagreus.errors import UserError
from zagreus.model.config import ModelConfig
from zagreus.model.hf import HF_KEYS, load_hf
from zagreus.model.llama import Transformer, build_model, meta_model
from zagreus.rundir import (META, enclosing_run, is_checkpoint, latest_checkpoint, list_checkpoints, locate, read_meta,
                            resolve_checkpoint, set_aside, step_name)
from zagreus.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

FILES = "files"  # meta.json's record of the other files: {name: {"size": bytes, HASH: hex digest}}
HASH = "xxh3_128"  # 12.7 GB/s on one CPU core: 0.45 s of the 8 s a 0.4B save takes (benchmarks/checkpoint_hash.py)
FULL = 1 << 20  # a disk that failed a write with less than this free is full


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """zagreus.__version__ plus the git commit of the source tree, when it is a checkout."""
    version = {"zagreus": zagreus.__version__, "torch": torch.__version__}
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(zagreus.__file__).parent, capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            version["git"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict, keep: int | None = None, rank_state: dict | None = None,
                    permanent_every: int | None = None) -> Path:
    """Write checkpoint `step` under `root` atomically (every rank calls this); prune to the last `keep`,
    except the steps that are multiples of `permanent_every`.

    meta: JSON-able facts of the run (tokens seen, loader state, recipe...); step, code version
    and the files' sizes and hashes are added. rank_state: this rank's own small objects (RNG
    states), torch.save'd. On a full, read-only, forbidden or failing disk the partial folder is
    removed and an OSError naming the path is raised (the CLI prints ENOSPC, EROFS, EACCES and EIO
    as one line); the checkpoints already there stay as they were.
    """
    # DCP is imported where it is used: opening an export (eval, chat, serve) needs none of its second of imports.
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    tmp = root / f".tmp-{step_name(step)}"
    try:
        return _save(root, tmp, step, model, optimizer, meta, keep, rank_state, permanent_every)
    except (Exception, dcp.CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        failure = _os_error(exc, root)  # before the partial folder goes, so that a full disk still shows
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            raise
        raise failure from exc


def _save(root: Path, tmp: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, meta: dict,
          keep: int | None, rank_state: dict | None, permanent_every: int | None) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    rank, _ = _rank_world()
    final = root / step_name(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed earlier
        tmp.mkdir()
    _barrier()
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(tmp), no_dist=_no_dist())
    # Through a Python file, so that a failed write's OSError (errno) survives torch's "unexpected pos" error.
    with open(tmp / f"rank-{rank}.pt", "wb") as f:
        torch.save(rank_state or {}, f)
    _barrier()
    if rank == 0:
        # After the barrier every rank's files are complete; rank 0 hashes them all (they share the folder).
        files = {p.name: {"size": p.stat().st_size, HASH: file_digest(p)} for p in sorted(tmp.iterdir())}
        full_meta = {"step": step, **meta, "code_version": code_version(), FILES: files}
        meta_tmp = tmp / (META + ".tmp")
        with open(meta_tmp, "w", encoding="utf-8") as f:
            json.dump(full_meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(meta_tmp, tmp / META)
        if final.exists():  # the same step saved again (a resumed run ending where it resumed)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        if keep is not None:
            for old_step, old in list_checkpoints(root)[:-keep]:
                if not (permanent_every and old_step % permanent_every == 0):
                    shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def file_digest(path: Path, new=xxhash.xxh3_128) -> str:
    """The hex digest of a file's bytes with the hash `new` makes (xxh3-128, what checkpoints record)."""
    digest = new()
    buffer = bytearray(1 << 24)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _os_error(exc: BaseException, root: Path) -> OSError | None:
    """The OS error behind a failed save, as an OSError naming a path; None when the OS is not the cause.

    torch.save reports a failed write as "unexpected pos" (a RuntimeError whose __context__ holds
    the OSError) and DCP wraps each rank's failure in a CheckpointException. Under torchrun those
    arrive pickled: an OSError keeps its errno, a RuntimeError loses its context, so a full disk
    is also recognised by its free space.
    """
    import torch.distributed.checkpoint as dcp

    pending: list[BaseException] = [exc]
    while pending:
        error = pending.pop()
        if isinstance(error, OSError) and error.errno:
            return OSError(error.errno, os.strerror(error.errno), error.filename or str(root))
        if isinstance(error, dcp.CheckpointException):
            pending += [failure for failure, _ in error.failures.values()]
        pending += [e for e in (error.__cause__, error.__context__) if e is not None]
    if root.is_dir() and shutil.disk_usage(root).free < FULL:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root))
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Verdict:
    damage: str | None  # which files differ from meta.json's record and how; None when all match
    checked: bool  # the files were compared with recorded checksums (not for checkpoints saved before they carried them)


def verify_checkpoint(checkpoint: Path) -> Verdict:
    """Every file of a checkpoint against the size and hash its meta.json records."""
    try:
        records = json.loads((checkpoint / META).read_text(encoding="utf-8")).get(FILES)
    except ValueError as exc:  # not JSON (cut short) or not UTF-8
        return Verdict(f"{META}: unreadable ({exc})", False)
    if records is None:
        return Verdict(None, False)
    damage = []
    for name, want in records.items():
        path = checkpoint / name
        if not path.is_file():
            damage.append(f"{name}: missing")
        elif (size := path.stat().st_size) != want["size"]:
            damage.append(f"{name}: {size:,} bytes, {META} records {want['size']:,}")
        elif (digest := file_digest(path)) != want[HASH]:
            damage.append(f"{name}: {HASH} {digest[:16]}, {META} records {want[HASH][:16]} (bytes changed)")
    return Verdict("; ".join(damage) or None, True)


def latest_intact_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint under `root` whose files match its meta.json (every rank calls this).

    Rank 0 verifies from the newest down and sets each damaged one aside as step-N.corrupt, with one
    warning line saying which file differs and how. Nothing is deleted.
    """
    before = list_checkpoints(root)
    _barrier()  # every rank has listed before rank 0 renames anything
    if _rank_world()[0] == 0:
        for _, checkpoint in reversed(before):
            verdict = verify_checkpoint(checkpoint)
            if verdict.damage is None:
                if not verdict.checked:
                    log.info("%s carries no checksums (saved before checkpoints did); loading it unverified", checkpoint)
                break
            aside = set_aside(checkpoint)
            log.warning("checkpoint %s is damaged: %s; set aside as %s, resuming from the newest intact one",
                        checkpoint, verdict.damage, aside.name)
    _barrier()
    latest = latest_checkpoint(root)
    if before and latest is None:
        raise UserError(f"{root}: every checkpoint is damaged (set aside as step-N.corrupt, see the lines above); "
                        f"restore one from a copy, or run the same command again to train from step 0")
    return latest


def load_checkpoint(checkpoint: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict]:
    """Load model (and optimizer) state in place from a checkpoint folder; returns (meta, this rank's state).

    Works whatever the current layout (plain, FSDP2, TP): DCP reshards to the tensors
    get_state_dict hands it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    checkpoint = Path(checkpoint)
    if not is_checkpoint(checkpoint):
        raise UserError(f"{checkpoint}: not a complete checkpoint (no {META})")
    rank, _ = _rank_world()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(checkpoint), no_dist=_no_dist())
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            state = {"model": get_model_state_dict(model)}
            dcp.load(state, checkpoint_id=str(checkpoint), no_dist=_no_dist())
            set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    rank_file = checkpoint / f"rank-{rank}.pt"
    rank_state = torch.load(rank_file, weights_only=False) if rank_file.is_file() else {}
    return read_meta(checkpoint), rank_state


def _find_tokenizer(checkpoint: Path, meta: dict) -> Path:
    """The folder meta.json records (relative to the checkpoint), else the enclosing run's tokenizer/."""
    recorded = meta.get("tokenizer_dir")
    if recorded and (checkpoint / recorded).is_dir():
        return checkpoint / recorded
    run = enclosing_run(checkpoint)
    if run is not None and (run.tokenizer / "tokenizer.json").is_file():
        return run.tokenizer
    raise UserError(f"{checkpoint}: cannot find the tokenizer folder of this checkpoint "
                    f"(meta.json tokenizer_dir={recorded!r}, and no run directory with a tokenizer/ around it)")


def load_checkpoint_model(path: str | Path, device: str = "cpu") -> tuple[Transformer, Tokenizer]:
    """(Transformer, Tokenizer) from a checkpoint folder or a run directory (its latest checkpoint)."""
    checkpoint = resolve_checkpoint(path)
    meta = read_meta(checkpoint)
    if "model_config" not in meta:
        raise UserError(f"{checkpoint}/{META}: no model_config; this checkpoint was not written by zagreus")
    model = build_model(ModelConfig(**meta["model_config"]), device=device, seed=None)
    load_checkpoint(checkpoint, model)
    model.eval()
    tokenizer = load_tokenizer(str(_find_tokenizer(checkpoint, meta)))
    return model, tokenizer


# The ModelConfig fields that decide the tensors' shapes, and those that decide what the weights compute.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "tie_embeddings")
MEANING_FIELDS = ("rope_theta", "rope_scaling", "norm_eps")


def check_shape(found: ModelConfig, want: ModelConfig, key: str, path: Path, where: str,
                fields: tuple[str, ...] = SHAPE_FIELDS) -> None:
    """One UserError line naming `key` when the model at `path` (its config `found`) differs from the
    recipe's (`want`, described by `where`) in `fields`: the first field, and the first tensor whose shape differs."""
    differ = [name for name in fields if getattr(found, name) != getattr(want, name)]
    if not differ:
        return
    name = differ[0]
    hf_key = HF_KEYS.get(name, name)
    label = name if hf_key == name else f"{name} ({hf_key} in config.json)"
    value = lambda cfg: cfg.rope_scaling.model_dump() if name == "rope_scaling" and cfg.rope_scaling else getattr(cfg, name)
    problem = f"{label} is {value(found)!r} there but {value(want)!r} in the recipe's model ({where})"
    tensor = _tensor_difference(found, want)
    if tensor:
        problem += f"; tensor {tensor}"
    raise UserError(f"{key} {path}: the starting model does not fit the recipe: {problem}. Set model.preset and "
                    f"model.overrides to the starting model's shape, or point {key} at a model of the recipe's")


def _tensor_difference(found: ModelConfig, want: ModelConfig) -> str | None:
    """'NAME is [a, b] there, [c, d] by the recipe' for the first tensor (Hugging Face name) whose shape differs."""
    theirs = {name: list(t.shape) for name, t in meta_model(found).state_dict().items()}
    ours = {name: list(t.shape) for name, t in meta_model(want).state_dict().items()}
    for name in [*ours, *(n for n in theirs if n not in ours)]:
        if theirs.get(name) != ours.get(name):
            hf_name = name if name == "lm_head.weight" else f"model.{name}"
            return f"{hf_name} is {theirs.get(name) or 'absent'} there, {ours.get(name) or 'absent'} by the recipe"
    return None


def load_init(path: Path, key: str, want: Callable[[Tokenizer], ModelConfig] | None = None, where: str = "",
              fields: tuple[str, ...] = SHAPE_FIELDS, device: str = "cpu") -> tuple[Transformer, Tokenizer]:
    """A stage's starting model (`key`: pretrain.init, sft.init, dpo.init): a Hugging Face folder (a Zagreus
    export or any Llama-architecture one, such as transformers' save_pretrained writes), a checkpoint or a
    run directory. `want(tokenizer)` is the recipe's model (described by `where`) that it must match in `fields`."""
    if not Path(path).exists():
        raise UserError(f"{key}: starting model {path} does not exist; fix the path")
    model, tokenizer = load_model_and_tokenizer(path, device=device)
    if want is not None:
        check_shape(model.cfg, want(tokenizer), key, Path(path), where, fields)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{key} {path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.cfg.vocab_size}")
    return model, tokenizer


def load_model_and_tokenizer(path: str | Path, device: str = "cpu") -> tuple[Transformer, Tokenizer]:
    """(Transformer, Tokenizer) from a Hugging Face export folder, a zagreus checkpoint or a run directory."""
    found = locate(path)
    if found.kind == "export":
        return load_hf(found.path, device=device), load_tokenizer(str(found.path))
    return load_checkpoint_model(found.path, device=device)
