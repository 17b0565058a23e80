"""Checkpoints: saving and loading training state, and opening any saved model for use.

Training checkpoints are torch.distributed.checkpoint folders with a meta.json, kept atomically.

A checkpoint is `<root>/step-000100/`: DCP files holding {"model", "optim"} (built with
torch.distributed.checkpoint.state_dict, so the same code saves a plain model, FSDP2 or TP
DTensors, and loads under another layout), one `rank-N.pt` per rank with its RNG state, and
meta.json (step, tokens seen in total and per source, data-loader state, recipe, model config,
tokenizer folder, code version). Everything is written under `.tmp-step-000100` and renamed;
meta.json is written last inside it, so a folder named step-N with a meta.json is complete and
a crash during a save never touches the checkpoints already there. Where checkpoints sit in a
run directory is zagreus.rundir's business.

`load_model_and_tokenizer(path)` opens an export folder, a checkpoint or a run directory's latest
checkpoint: what eval, serve, release and post-training start from. It lives below all of them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

import zagreus
from zagreus.errors import UserError
from zagreus.model.config import ModelConfig
from zagreus.model.hf import load_hf
from zagreus.model.llama import Transformer, build_model
from zagreus.rundir import META, enclosing_run, is_checkpoint, list_checkpoints, locate, read_meta, resolve_checkpoint, step_name
from zagreus.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

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
                    meta: dict, keep: int | None = None, rank_state: dict | None = None) -> Path:
    """Write checkpoint `step` under `root` atomically (every rank calls this); prune to the last `keep`.

    meta: JSON-able facts of the run (tokens seen, loader state, recipe...); step and code
    version are added. rank_state: this rank's own small objects (RNG states), torch.save'd.
    """
    root = Path(root)
    rank, _ = _rank_world()
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}"
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
    torch.save(rank_state or {}, tmp / f"rank-{rank}.pt")
    _barrier()
    if rank == 0:
        full_meta = {"step": step, **meta, "code_version": code_version()}
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
            for _, old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(checkpoint: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict]:
    """Load model (and optimizer) state in place from a checkpoint folder; returns (meta, this rank's state).

    Works whatever the current layout (plain, FSDP2, TP): DCP reshards to the tensors
    get_state_dict hands it.
    """
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


def load_model_and_tokenizer(path: str | Path, device: str = "cpu") -> tuple[Transformer, Tokenizer]:
    """(Transformer, Tokenizer) from a Hugging Face export folder, a zagreus checkpoint or a run directory."""
    found = locate(path)
    if found.kind == "export":
        return load_hf(found.path, device=device), load_tokenizer(str(found.path))
    return load_checkpoint_model(found.path, device=device)
