"""What SFT and DPO share: opening the starting model, the device and autocast, tokenized
sequences with shifted labels, padded batches, metrics files and the final export."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from zagreus import __version__
from zagreus.devices import pick_device
from zagreus.errors import UserError

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


def tokenization_report(what: str, kept: int, truncated: int, empty: int, seq_len: int) -> dict:
    """Log what tokenizing for seq_len cut or dropped, and return the counts for summary.json."""
    if truncated:
        log.warning("%d %s(s) longer than seq_len %d were cut at the end", truncated, what, seq_len)
    if empty:
        log.warning("%d %s(s) had no trained token within seq_len %d and were dropped", empty, what, seq_len)
    return {f"{what}s": kept, "truncated": truncated, "dropped_no_trained_token": empty}


def autocast(device: torch.device):
    """bf16 autocast on GPU; fp32 on CPU (this CPU kind has no native bf16)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def open_init(init: str | None, recipe, default: Path, what: str, device: torch.device):
    """(model, tokenizer) from `init` (resolved against the recipe) or the default location."""
    from zagreus.checkpoint import load_model_and_tokenizer

    path = recipe.resolve_path(init) if init else default
    if not path.exists():
        hint = f"set {what}.init to a checkpoint or export folder" if init is None else "fix the path"
        raise UserError(f"{what}: starting model {path} does not exist; {hint}")
    model, tok = load_model_and_tokenizer(path, device=str(device))
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{path}: tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}")
    log.info("%s: starting from %s (%s parameters)", what, path, f"{sum(p.numel() for p in model.parameters()):,}")
    return model, tok, path


def pad_id(tokenizer) -> int:
    for name in ("<|finetune_right_pad_id|>", "<|pad|>"):
        if name in tokenizer.special_tokens:
            return tokenizer.special_tokens[name]
    return tokenizer.eos_id


def padded_batch(seqs: list[Sequence], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens, labels [B, T] padded on the right; causal attention never sees the padding."""
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = torch.tensor(s.ids)
        labels[b, : len(s)] = torch.tensor(s.labels)
    return tokens.to(device), labels.to(device)


class Metrics:
    """Appends one JSON line per logged step (metrics.jsonl)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")
        self.start = time.time()

    def write(self, record: dict) -> None:
        record = {"time": round(time.time() - self.start, 3), **record}
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def export(model, tokenizer, out_dir: Path, template: str, metadata: dict) -> Path:
    """Write the HF folder with the chat template atomically: a crash leaves the old export intact."""
    from zagreus.model.hf import save_hf
    from zagreus.post.chat import jinja_template, stop_token_ids

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


def finished(stage_dir: Path) -> bool:
    summary = stage_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("finished", False)


@dataclass
class StageStart:
    """What sft and dpo both begin with: their section, output folder, device, starting model and examples."""

    sec: object
    out: Path
    device: torch.device
    model: object
    tokenizer: object
    init_path: Path
    examples: list
    stats: list


def open_stage(recipe, stage: str, default_init: Path, force: bool) -> StageStart | None:
    """Check the recipe's `stage` section, open the starting model and read the datasets; None if already finished."""
    from zagreus.post.datasets import load_examples

    sec = getattr(recipe, stage)
    if sec is None:
        raise UserError(f"{recipe.source_path}: no {stage}: section; add one (see recipes/nesso-0.4b-instruct.yaml)")
    if not sec.datasets:
        raise UserError(f"{recipe.source_path}: key '{stage}.datasets' is empty; list at least one dataset")
    out = recipe.run_path() / stage
    if finished(out) and not force:
        log.info("%s: %s is finished; pass --force to train again", stage, out)
        return None
    torch.manual_seed(sec.seed)
    device = pick_device(sec.device)
    model, tok, init_path = open_init(sec.init, recipe, default_init, stage, device)
    if sec.seq_len > model.cfg.max_seq_len:
        raise UserError(f"key '{stage}.seq_len' {sec.seq_len} exceeds the model's context {model.cfg.max_seq_len}; lower it")
    examples, stats = [], []
    for spec in sec.datasets:
        ex, st = load_examples(spec, recipe.resolve_path, stage)
        examples += ex
        stats.append(st)
    return StageStart(sec, out, device, model, tok, init_path, examples, stats)
