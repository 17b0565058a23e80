"""What SFT and DPO share: opening the starting model, tokenized sequences with shifted labels,
padded batches, the final export, and the stage itself on the trainer skeleton (`train_stage`):
output folder, resume, checkpoints, metrics, summary. The stages differ only in their Task.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from zagreus import __version__
from zagreus.checkpoint import load_init
from zagreus.devices import pick_device
from zagreus.errors import UserError
from zagreus.model.hf import save_hf
from zagreus.post.chat import jinja_template, stop_token_ids
from zagreus.post.datasets import dataset_files
from zagreus.post.ranks import Ranks, gathered_model, open_ranks, shard_model
from zagreus.post.shards import ChatShards, prepare_shards
from zagreus.recipe import dump_recipe
from zagreus.rundir import RunDir, StageDir
from zagreus.train.metrics import last_logged
from zagreus.train.optim import build_optimizer
from zagreus.train.trainer import Settings, Task, Trainer, run_facts

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class Sequence:
    """Token ids and next-token targets (IGNORE where no loss), both of the same length."""

    ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.ids)


def to_sequence(ids: list[int], trained: list[bool], seq_len: int) -> tuple[Sequence, bool]:
    """Shift the mask into targets (position i predicts token i+1) and cut to seq_len; returns
    (sequence, truncated)."""
    labels = [ids[i + 1] if trained[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]
    truncated = len(ids) > seq_len
    return Sequence(ids[:seq_len], labels[:seq_len]), truncated


def stand_in(pad: int) -> Sequence:
    """A one-token sequence with no target: what a rank with no example of its own runs, so that
    it still joins the data-parallel collectives while adding nothing."""
    return Sequence([pad], [IGNORE])


def open_init(init: str | None, recipe, default: Path, what: str, device: torch.device):
    """(model, tokenizer, path) from `init` (resolved against the recipe) or the default location.

    A recipe that writes a `model:` section states the model it post-trains: the starting model
    must have its shape (vocabulary from the starting tokenizer unless model.overrides sets one).
    Without one, the starting model's own shape is taken.
    """
    path = recipe.resolve_path(init) if init else default
    if not path.exists():
        hint = f"set {what}.init to a checkpoint or export folder" if init is None else "fix the path"
        raise UserError(f"{what}: starting model {path} does not exist; {hint}")
    want = None
    if "model" in recipe.model_fields_set:
        want = lambda tok: recipe.model.resolve(vocab_size=tok.vocab_size)  # noqa: E731
    model, tok = load_init(path, f"{what}.init", want, recipe.model.describe(), device=str(device))
    log.info("%s: starting from %s (%s parameters)", what, path, f"{sum(p.numel() for p in model.parameters()):,}")
    return model, tok, path


def pad_id(tokenizer) -> int:
    for name in ("<|finetune_right_pad_id|>", "<|pad|>"):
        if name in tokenizer.special_tokens:
            return tokenizer.special_tokens[name]
    return tokenizer.eos_id


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (a batch's T, which tensor parallelism shards)."""
    return -(-n // multiple) * multiple


def vocab_parallel_nll(logits, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy of vocabulary-sharded logits (a tensor-parallel model's; call inside
    loss_parallel) as a plain tensor: [B, T] (0 where ignored) or the sum."""
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction=reduction)
    nll = nll.to_local()  # replicated over the TP group
    return nll if reduction == "sum" else nll.view(labels.shape)


def padded_batch(seqs: list[Sequence], pad: int, device: torch.device,
                 multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens, labels [B, T] padded on the right (T a multiple of `multiple`); causal attention
    never sees the padding."""
    T = round_up(max(len(s) for s in seqs), multiple)
    tokens = torch.full((len(seqs), T), pad, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = torch.tensor(s.ids)
        labels[b, : len(s)] = torch.tensor(s.labels)
    return tokens.to(device), labels.to(device)


def export(model, tokenizer, out_dir: Path, template: str, metadata: dict) -> Path:
    """Write the HF folder with the chat template atomically: a crash leaves the old export intact."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_hf(model, tokenizer, tmp, chat_template=jinja_template(template))
    (tmp / "zagreus.json").write_text(json.dumps({"zagreus_version": __version__, "template": template, **metadata},
                                                 indent=2) + "\n")
    # Generation in transformers stops on any of these: the template's end of turn first.
    gen_path = tmp / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["eos_token_id"] = stop_token_ids(tokenizer, template)
    gen_path.write_text(json.dumps(gen, indent=2) + "\n")
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)
    return out_dir


class EpochTask(Task):
    """A post-training task over a fixed list of examples (rows or pairs), micro_batch x grad_accum x
    data-parallel ranks of them per optimizer step for sec.epochs epochs, in an order shuffled per epoch from the
    seed alone: the data position to save is the step itself. Each rank trains its block of a step
    (zagreus.post.ranks)."""

    def __init__(self, stage: str, items, what: str, model, sec, pad: int, ranks: Ranks, chunk: int):
        self.stage, self.items, self.what = stage, items, what
        self.model, self.sec, self.pad, self.ranks, self.chunk = model, sec, pad, ranks, chunk
        self.device = ranks.device
        self.per_rank = sec.micro_batch * sec.grad_accum
        self.per_step, self.seed = self.per_rank * ranks.dp, sec.seed
        self.steps_per_epoch = math.ceil(len(items) / self.per_step)
        self.total_steps = self.steps_per_epoch * sec.epochs
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def picked(self, step: int) -> tuple[int, list[int]]:
        """(epoch, indices of the items) of optimizer step `step`, over all ranks. The epoch's order
        is an int64 array (8 bytes an item), drawn from the seed and the epoch alone."""
        epoch, s = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._order = np.random.default_rng(self.seed * 1000 + epoch).permutation(len(self.items))
            self._epoch = epoch
        return epoch, self._order[s * self.per_step : (s + 1) * self.per_step].tolist()

    def micro_batches(self, step: int) -> tuple[int, list[list[int]], int]:
        """(epoch, this rank's micro-batches of item indices, the step's items over all ranks).

        With data parallelism every rank gets grad_accum micro-batches, empty ones included (the
        caller runs a stand-in for those); without, empty ones are skipped."""
        epoch, idx = self.picked(step)
        mine, mb = self.ranks.block(idx, self.per_rank), self.sec.micro_batch
        chunks = [mine[i : i + mb] for i in range(0, self.per_rank, mb)]
        return epoch, chunks if self.ranks.dp > 1 else [c for c in chunks if c], len(idx)

    def state(self) -> dict:
        return {self.what: len(self.items)}

    def restore(self, meta: dict) -> None:
        if meta.get(self.what) != len(self.items):
            raise UserError(f"{self.stage}: the checkpoint was trained on {meta.get(self.what)} {self.what} but the "
                            f"data now gives {len(self.items)}; the datasets or {self.stage}.seq_len changed. "
                            f"Pass --force to start over")


@dataclass
class StageStart:
    """What sft and dpo both begin with: their section, stage folder, ranks, starting model and tokenized data."""

    sec: object
    stage: StageDir
    ranks: Ranks
    model: object
    tokenizer: object
    init_path: Path
    shards: ChatShards


def open_stage(recipe, stage: str, default_init: Path, force: bool,
               encoder: Callable[[object, object], Callable]) -> StageStart | None:
    """Check the recipe's `stage` section, open the starting model (sharded over the ranks under
    torchrun) and the datasets tokenized to disk (`encoder(tokenizer, section)` encodes one
    example; every rank tokenizes its share the first time); None if already finished.

    --force starts over: the stage's checkpoints (and DPO's reference log-probabilities) are removed.
    """
    sec = getattr(recipe, stage)
    if sec is None:
        raise UserError(f"{recipe.source_path}: no {stage}: section; add one (see recipes/nesso-0.4b-instruct.yaml)")
    if not sec.datasets:
        raise UserError(f"{recipe.source_path}: key '{stage}.datasets' is empty; list at least one dataset")
    folder = RunDir(recipe.run_path()).stage(stage)
    device = pick_device(sec.device, int(os.environ.get("LOCAL_RANK", "0")))
    ranks = open_ranks(stage, sec, device)
    if force:
        if ranks.is_main:
            shutil.rmtree(folder.checkpoints, ignore_errors=True)
            folder.reference.unlink(missing_ok=True)
        ranks.barrier()
    elif folder.finished():
        log.info("%s: %s is finished; pass --force to train again", stage, folder.root)
        return None
    torch.manual_seed(sec.seed)
    model, tok, init_path = open_init(sec.init, recipe, default_init, stage, device)
    if sec.seq_len > model.cfg.max_seq_len:
        raise UserError(f"key '{stage}.seq_len' {sec.seq_len} exceeds the model's context {model.cfg.max_seq_len}; lower it")
    shard_model(model, ranks, stage, sec)
    shards = prepare_shards(folder.data, data_key(recipe, sec, tok), sec.datasets, recipe.resolve_path, stage,
                            encoder(tok, sec), rank=ranks.rank, world=ranks.world, barrier=ranks.barrier,
                            workers=sec.tokenize_workers)
    if not len(shards):
        what = "conversation has an assistant token" if stage == "sft" else "pair has completion tokens"
        raise UserError(f"{stage}: no {what} within seq_len; raise {stage}.seq_len")
    return StageStart(sec, folder, ranks, model, tok, init_path, shards)


def data_key(recipe, sec, tokenizer) -> dict:
    """What the stage's tokenized data is made from: datasets (with the size and time of every local
    file, so an edited file is tokenized again), template, seq_len and tokenizer."""
    files = []
    for spec in sec.datasets:
        for p in dataset_files(spec, recipe.resolve_path) if spec.hub is None else []:
            st = p.stat()
            files.append([str(p), st.st_size, st.st_mtime_ns])
    return {"datasets": [d.model_dump(mode="json") for d in sec.datasets], "files": files, "template": sec.template,
            "seq_len": sec.seq_len, "tokenizer": tokenizer.identity()}


def train_stage(recipe, start: StageStart, task: EpochTask, summary: Callable[[dict], dict]) -> Path | None:
    """Run `task` on the trainer, resuming from the stage's latest checkpoint; then export and write
    summary.json (the stage's facts from `summary(last_metrics)`). None when stopped by SIGTERM.
    Under torchrun every rank trains; rank 0 alone writes the files outside the checkpoints."""
    sec, folder, name, ranks = start.sec, start.stage, start.stage.name, start.ranks
    run = RunDir(recipe.run_path())
    if ranks.is_main:
        folder.root.mkdir(parents=True, exist_ok=True)
        folder.recipe.write_text(dump_recipe(recipe), encoding="utf-8")
        if not run.recipe.is_file():  # a post-training-only run: the run directory starts here
            run.recipe.write_text(dump_recipe(recipe), encoding="utf-8")
        if not (folder.tokenizer / "tokenizer.json").is_file():  # what the stage's checkpoints load with
            start.tokenizer.save(folder.tokenizer)
    optimizer = build_optimizer(start.model, sec.optimizer)
    clip = None
    if ranks.world > 1:  # gradients are DTensor shards: the norm is taken over all of them
        from zagreus.train.parallel import clip_grad_norm_

        params = list(start.model.parameters())
        clip = lambda max_norm: clip_grad_norm_(params, max_norm)  # noqa: E731
    trainer = Trainer(task, start.model, optimizer, Settings.of(name, sec, task.total_steps),
                      checkpoints=folder.checkpoints, metrics_dir=folder.metrics_dir, device=ranks.device,
                      world=ranks.world, is_main=ranks.is_main, clip_grad_norm=clip, tokenizer_dir=folder.tokenizer,
                      meta=run_facts(start.model.cfg, recipe, stage=name, init=str(start.init_path)))
    trainer.resume()
    # A run killed after its last checkpoint but before the export has nothing left to train.
    last = trainer.run() or last_logged(folder.metrics_dir)
    if last.get("stopped_by_signal"):
        return None
    if trainer.step < 1:  # marked finished, a stage that learnt nothing would make a corrected rerun a no-op
        raise UserError(f"{name}: trained no step ({task.total_steps} planned from {len(task.items)} {task.what}, "
                        f"{name}.epochs {sec.epochs}); nothing exported and the stage is not marked finished")
    start.model.eval()
    whole = gathered_model(start.model, ranks)
    if ranks.is_main:
        export(whole, start.tokenizer, folder.export, sec.template, {"stage": name, "init": str(start.init_path)})
        facts = {"finished": True, "stage": name, "init": str(start.init_path), "template": sec.template,
                 "steps": task.total_steps, "epochs": sec.epochs, "ranks": ranks.world, **summary(last),
                 **start.shards.stats, "export": str(folder.export)}
        folder.summary.write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    ranks.barrier()  # the export is complete before any rank returns it
    return folder.export
