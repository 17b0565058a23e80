"""The run directory: the one owner of its layout, and of the answer to "what is this folder?".

Every stage writes into `runs/<name>/` and finds another stage's output only through this
module, so the layout below is written down once:

    recipe.yaml                    the resolved recipe (written by the first stage that runs)
    tokenizer/                     tokenizer.json + tokenizer_config.json
    data/manifest.json             the data stage's record; data/{train,val}/<source>/*.ds shards
    checkpoints/step-N/            pretraining checkpoints (DCP shards, rank-N.pt, meta.json)
    metrics.jsonl, tb/             pretraining curves
    exports/step-N/                Hugging Face folders written by `zagreus export`
    eval/step-N.json               lm-eval results per checkpoint; eval/progression.{md,csv,png}
    eval/sft.json, eval/dpo.json   lm-eval results of a post-training stage's export (`zagreus run`'s final-eval)
    eval/compare.{md,csv,png}      `zagreus compare --run`: this run's model against others
    eval/delta.{md,csv,png}        `zagreus compare --delta --run`: base against fine-tune, task by task
    sft/, dpo/                     post-training stages (see StageDir)
    release/                       the released model with its model card

A checkpoint folder is complete when it holds meta.json (written last, then the folder renamed).
A damaged one is set aside as step-N.corrupt, which no listing counts as a checkpoint.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from zagreus.errors import UserError

META = "meta.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
POST_STAGES = ("sft", "dpo")


def step_name(step: int) -> str:
    """The folder name of step `step` (checkpoints, exports and eval results share it)."""
    return f"step-{step:06d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, folder) of a checkpoints/ folder, or of the run or stage folder holding one."""
    root = Path(root)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / META).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint to step-N.corrupt (step-N.corrupt-2, ... when set aside before), out of every listing."""
    names = (f"{checkpoint.name}.corrupt" + (f"-{n}" if n > 1 else "") for n in itertools.count(1))
    target = next(checkpoint.with_name(name) for name in names if not checkpoint.with_name(name).exists())
    checkpoint.rename(target)
    return target


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def read_meta(checkpoint: str | Path) -> dict:
    path = Path(checkpoint) / META
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{checkpoint}: not a complete checkpoint (no {META})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); delete this checkpoint folder to fall back to the previous one") from None


def is_export(path: Path) -> bool:
    return (path / "config.json").is_file()


def is_checkpoint(path: Path) -> bool:
    return (path / META).is_file()


@dataclass(frozen=True)
class StageDir:
    """A post-training stage's folder, runs/<name>/sft or runs/<name>/dpo."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    recipe = property(lambda self: self.root / "recipe.yaml")
    tokenizer = property(lambda self: self.root / "tokenizer")
    checkpoints = property(lambda self: self.root / "checkpoints")
    metrics_dir = property(lambda self: self.root)  # metrics.jsonl and tb/ sit in the stage folder
    export = property(lambda self: self.root / "export")
    summary = property(lambda self: self.root / "summary.json")
    reference = property(lambda self: self.root / "reference_logprobs.pt")  # DPO's, computed once
    data = property(lambda self: self.root / "data")  # the datasets tokenized once (post.shards)

    def read_summary(self) -> dict:
        return json.loads(self.summary.read_text(encoding="utf-8")) if self.summary.is_file() else {}

    def finished(self) -> bool:
        return bool(self.read_summary().get("finished"))

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoints)


@dataclass(frozen=True)
class RunDir:
    """runs/<name>/ and every path in it (see the module docstring)."""

    root: Path

    recipe = property(lambda self: self.root / "recipe.yaml")
    tokenizer = property(lambda self: self.root / "tokenizer")
    data = property(lambda self: self.root / "data")
    manifest = property(lambda self: self.root / "data" / "manifest.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    metrics_dir = property(lambda self: self.root)
    exports = property(lambda self: self.root / "exports")
    eval = property(lambda self: self.root / "eval")
    release = property(lambda self: self.root / "release")

    def stage(self, name: str) -> StageDir:
        if name not in POST_STAGES:
            raise ValueError(f"unknown post-training stage {name!r}")
        return StageDir(self.root / name)

    def export_dir(self, step: int) -> Path:
        return self.exports / step_name(step)

    def eval_result(self, checkpoint: Path) -> Path:
        """The cached lm-eval results of a checkpoint: eval/<its folder name>.json."""
        return self.eval / f"{Path(checkpoint).name}.json"

    def stage_eval(self, stage: str) -> Path:
        """eval/<stage>.json: the lm-eval results of post-training stage `stage`'s export."""
        return self.eval / f"{self.stage(stage).name}.json"

    def progression(self, suffix: str | None = "md") -> Path:
        """eval/progression.<suffix>: md, csv or png (None: the stem the table writer adds suffixes to)."""
        stem = self.eval / "progression"
        return stem if suffix is None else stem.with_suffix(f".{suffix}")

    def comparison(self, suffix: str = "md") -> Path:
        """eval/compare.<suffix> (md, csv, png): `zagreus compare --run` writes it, the model card embeds it."""
        return (self.eval / "compare").with_suffix(f".{suffix}")

    def delta(self, suffix: str = "md") -> Path:
        """eval/delta.<suffix> (md, csv, png): `zagreus compare --delta --run` writes it, the model card embeds it."""
        return (self.eval / "delta").with_suffix(f".{suffix}")

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        return list_checkpoints(self.checkpoints)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoints)

    def final_model(self) -> Path | None:
        """The last model the run made: DPO's export, else SFT's, else the latest pretraining checkpoint."""
        for name in reversed(POST_STAGES):
            stage = self.stage(name)
            if stage.finished() and is_export(stage.export):
                return stage.export
        return self.latest_checkpoint()

    @staticmethod
    def looks_like_run(path: Path) -> bool:
        """A folder any stage has written into as a run directory (and not a stage folder inside one)."""
        path = Path(path)
        if path.name in POST_STAGES and RunDir.looks_like_run(path.parent):
            return False
        return ((path / "recipe.yaml").is_file() or (path / "checkpoints").is_dir()
                or (path / "data" / "manifest.json").is_file())


Kind = Literal["run", "checkpoint", "export"]


@dataclass(frozen=True)
class Located:
    """What a path names: a run directory, a checkpoint or an export folder, and the run it belongs to."""

    kind: Kind
    path: Path
    run: RunDir | None  # the enclosing run directory, if any
    stage: str | None  # "pretrain", "sft", "dpo": which stage of that run made it (None for a run dir)


def enclosing_run(path: Path) -> RunDir | None:
    """The run directory holding `path` (or `path` itself), if any."""
    for folder in (Path(path), *Path(path).resolve().parents):
        if RunDir.looks_like_run(folder):
            return RunDir(folder)
    return None


def _stage_of(path: Path, run: RunDir | None) -> str | None:
    if run is None:
        return None
    for name in POST_STAGES:
        if path.resolve().is_relative_to(run.stage(name).root.resolve()):
            return name
    return "pretrain"


def locate(path: str | Path) -> Located:
    """Say what `path` is; a UserError naming what was looked for when it is none of them."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder; pass an export folder, a checkpoint or a run directory")
    if is_export(path):
        run = enclosing_run(path)
        return Located("export", path, run, _stage_of(path, run))
    if is_checkpoint(path):
        run = enclosing_run(path)
        return Located("checkpoint", path, run, _stage_of(path, run))
    if RunDir.looks_like_run(path):
        return Located("run", path, RunDir(path), None)
    raise UserError(f"{path}: neither an export folder (config.json), a checkpoint (meta.json) nor a run directory "
                    f"(recipe.yaml, checkpoints/ or data/manifest.json)")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, a checkpoints/ folder or a run directory (its latest complete one)."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise UserError(f"{path}: no complete checkpoint here (looked for checkpoints/step-N/{META}); "
                        f"run `zagreus pretrain RECIPE` first or pass a checkpoint folder")
    return latest
