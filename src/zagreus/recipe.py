"""The YAML recipe: pydantic models of every stage's section, the one place for defaults.

A recipe is strict: an unknown key, a wrong type or a missing input file ends with one line
naming the file, the key and what is expected. Relative paths are resolved against the
folder holding the recipe, and `$VARS` are expanded, so a recipe works from any directory.
"""

from __future__ import annotations

import difflib
import glob
import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from zagreus.errors import UserError, decode_utf8
from zagreus.model.config import ModelConfig, resolve_model_config


def as_paths(path: str | list[str] | None) -> list[str]:
    """A `path:` key (one path or glob, a list of them, or none) as a list."""
    if path is None:
        return []
    return [path] if isinstance(path, str) else list(path)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Seeds count from 0; torch.manual_seed refuses 2**64 and above.
Seed = Annotated[int, Field(ge=0, lt=2**64)]
# A training sequence holds at least one token and the one after it to predict.
SeqLen = Annotated[int, Field(ge=2)]


# --- tokenizer ------------------------------------------------------------------------------
class TokenizerTrain(Strict):
    vocab_size: int = Field(8192, ge=300)
    max_chars: int = Field(20_000_000, ge=1, description="characters of the training sources fed to the BPE trainer")


class TokenizerSection(Strict):
    kind: Literal["llama3"] | None = "llama3"
    path: str | None = None
    train: TokenizerTrain | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "TokenizerSection":
        if self.path is not None or self.train is not None:
            self.__dict__["kind"] = None
        if sum(x is not None for x in (self.kind, self.path, self.train)) != 1:
            raise ValueError("set exactly one of kind: llama3, path: DIR, train: {vocab_size: N}")
        return self


# --- data -----------------------------------------------------------------------------------
class Source(Strict):
    name: str
    weight: float = Field(1.0, gt=0)
    hub: str | None = Field(None, description="Hugging Face dataset id")
    config: str | None = None
    split: str = "train"
    revision: str | None = Field(None, description="hub: the dataset's branch, tag or commit; the stage resolves it "
                                                   "(default the main branch) to a commit, reads every unit at that "
                                                   "commit and records it in the manifest")
    streaming: bool = True
    path: str | list[str] | None = Field(None, description="local file, folder or glob(s)")
    stdlib: bool = Field(False, description="the local Python standard library as a code source")
    text_field: str = "text"
    language: str | None = Field(None, description="keep only documents whose `lang` field (if any) equals this")
    code: bool = Field(False, description="a code source: no language ID or prose quality rules (stdlib sources are code)")
    max_documents: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_origin(self) -> "Source":
        if sum((self.hub is not None, self.path is not None, self.stdlib)) != 1:
            raise ValueError(f"source '{self.name}': set exactly one of hub: DATASET, path: FILE_OR_GLOB, stdlib: true")
        return self

    def paths(self) -> list[str]:
        return as_paths(self.path)


class MinHashSection(Strict):
    num_perm: int = Field(112, ge=1)
    bands: int = Field(14, ge=1)
    ngram: int = Field(5, ge=1)
    threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard similarity from which a document is a duplicate")

    @model_validator(mode="after")
    def _bands_divide(self) -> "MinHashSection":
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be a multiple of bands ({self.bands})")
        return self


class FiltersSection(Strict):
    min_chars: int = Field(200, ge=0)
    max_chars: int | None = Field(1_000_000, ge=1, description="None: no upper bound")
    languages: list[str] | None = Field(None, description="ISO 639-1 codes kept by language identification")
    language_threshold: float = Field(0.5, ge=0, le=1, description="least confidence of the language identifier")
    quality: bool = True
    dedup: Literal["none", "exact", "minhash"] = "exact"
    minhash: MinHashSection = MinHashSection()

    @model_validator(mode="after")
    def _lengths(self) -> "FiltersSection":
        if self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) exceeds max_chars ({self.max_chars}); no document would pass")
        return self


class ExecutorSection(Strict):
    kind: Literal["local", "datatrove", "slurm", "ray"] = Field(
        "local", description="local: our process pool; datatrove: its LocalPipelineExecutor; slurm: its "
                             "SlurmPipelineExecutor; ray: its RayPipelineExecutor on the Ray cluster of RAY_ADDRESS "
                             "(or a local one), for clouds without Slurm")
    workers: int = Field(2, ge=1)
    tasks: int = Field(0, ge=0, description="shards of work; 0 means one per worker")
    partition: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: float = Field(2.0, gt=0)
    logging_dir: str | None = None
    job_name: str = "zagreus-data"
    env_command: str | None = Field(None, description="slurm: shell line activating the environment (default: this venv)")

    @property
    def task_count(self) -> int:
        """The tasks the work units are shared among: `tasks` on datatrove's executors (0: one per
        worker), the workers of our local pool."""
        return self.workers if self.kind == "local" else self.tasks or self.workers


class DataSection(Strict):
    sources: list[Source]
    filters: FiltersSection = FiltersSection()
    tokens: float | None = Field(None, gt=0, description="total token budget; None takes every document")
    validation_fraction: float = Field(0.01, ge=0, lt=1)
    shard_tokens: int = Field(100_000_000, ge=1000)
    unit_bytes: int = Field(4 << 20, ge=1024, description="input bytes per work unit (the grain of parallelism and resume)")
    add_bos: bool = True
    add_eos: bool = False
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="a damaged input file (gzip/zstd stream or parquet cut short or corrupt): fail stops "
                            "naming the file and byte; skip leaves the whole file out, counted in the manifest")
    executor: ExecutorSection = ExecutorSection()

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[Source]) -> list[Source]:
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if not sources:
            raise ValueError("at least one source is needed")
        return sources


# --- model ----------------------------------------------------------------------------------
class ModelSection(Strict):
    preset: str | None = "zagreus-0.4b"
    overrides: dict = Field(default_factory=dict, description="ModelConfig fields replacing the preset's")

    def resolve(self, vocab_size: int | None = None) -> ModelConfig:
        fields = dict(self.overrides)
        if vocab_size is not None and "vocab_size" not in fields:
            fields["vocab_size"] = vocab_size
        return resolve_model_config(self.preset, **fields)

    def describe(self) -> str:
        """The section as messages name it: model.preset X, model.overrides {...}."""
        parts = [f"model.preset {self.preset}"] if self.preset else []
        if self.overrides:
            parts.append(f"model.overrides {self.overrides}")
        return ", ".join(parts) or "model: no preset, no overrides"


# --- pretraining ----------------------------------------------------------------------------
class OptimizerSection(Strict):
    lr: float = Field(3e-3, ge=0)
    # torch's AdamW refuses betas outside [0, 1) and a negative eps or weight_decay.
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    eps: float = Field(1e-8, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    clip: float = Field(1.0, ge=0, description="gradient norm clipped to; 0 does not clip")
    decay_norms_and_embeddings: bool = False


class ScheduleSection(Strict):
    kind: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup: int = Field(4000, ge=0)
    decay: int = Field(50_000, ge=0, description="wsd: steps of the final linear decay")
    min_lr: float = Field(1e-7, ge=0)


class ParallelSection(Strict):
    """Degrees on one DeviceMesh (product = torchrun's world size); see zagreus.train.parallel."""

    dp_shard: int = Field(-1, ge=-1, description="FSDP2 degree; -1 takes every rank left by the others")
    dp_replicate: int = Field(1, ge=1, description="replicas of the dp_shard groups (HSDP), or plain replication")
    tp: int = Field(1, ge=1, description="tensor parallel degree (keep within a node)")
    pp: int = Field(1, ge=1, description="pipeline stages (needs untied embeddings)")
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    pp_microbatches: int = Field(0, ge=0, description="pipeline micro-batches per step; 0 = pp")
    param_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="FSDP2 compute dtype of parameters; auto = bfloat16 on CUDA, float32 on CPU")
    reduce_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of FSDP2's gradient reduce-scatter / all-reduce (float32 keeps the sum exact to "
                               "fp32 whatever param_dtype is)")
    loss_parallel: bool = Field(True, description="with tp > 1, keep logits sharded over the vocabulary in the loss")

    @field_validator("dp_shard")
    @classmethod
    def _some_ranks(cls, dp_shard: int) -> int:
        if dp_shard == 0:
            raise ValueError("use 1 or more, or -1 for every rank left by the others")
        return dp_shard


class CheckpointSection(Strict):
    every: int = Field(5000, ge=1)
    keep: int = Field(5, ge=1, description="the newest checkpoints kept; older ones are deleted")
    keep_every: int | None = Field(None, ge=1, description="also keep every Nth checkpoint forever (steps that are "
                                                           "multiples of keep_every x every), so the rows of the "
                                                           "evaluation progression survive pruning")

    @property
    def permanent_every(self) -> int | None:
        """The step interval of the checkpoints that pruning never deletes."""
        return self.keep_every * self.every if self.keep_every else None


class PretrainSection(Strict):
    init: str | None = Field(None, description="continued pretraining: step 0 starts from this model's weights (a "
                                               "Hugging Face folder, a checkpoint or a run directory) instead of a "
                                               "random init; it must have the shape of `model:`")
    seq_len: SeqLen = 4096
    micro_batch: int = Field(4, ge=1)
    tokens_per_step: int | None = Field(None, ge=1, description="global batch in tokens; sets gradient accumulation")
    steps: int = Field(800_000, ge=1)
    seed: Seed = 0
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection = ScheduleSection()
    parallel: ParallelSection = ParallelSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(1000, ge=1)
    eval_batches: int = Field(20, ge=1, description="held-out batches of each validation")
    compile: bool = False
    activation_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    loss_chunk: int = Field(1024, ge=1, description="tokens per chunk of the cross-entropy over the vocabulary "
                                                    "(one chunk of fp32 logits: 1024 x 128,256 x 4 B = 525 MB)")
    peak_flops: float | None = Field(None, gt=0, description="peak FLOP/s per device for MFU; None measures it")
    max_bad_steps: int = Field(5, ge=1, description="non-finite steps in a row that stop the run")

    @model_validator(mode="after")
    def _whole_micro_batches(self) -> "PretrainSection":
        # The data-parallel ranks multiply this further; only torchrun knows them.
        if self.tokens_per_step is not None and self.tokens_per_step % (self.seq_len * self.micro_batch):
            raise ValueError(f"tokens_per_step ({self.tokens_per_step}) must be a multiple of seq_len x micro_batch "
                             f"({self.seq_len * self.micro_batch})")
        return self


# --- evaluation -----------------------------------------------------------------------------
# The one default of every evaluation entry point (recipe, CLI, lm-eval's model_args, the pretraining quick eval).
EVAL_BATCH_SIZE = 16


class EvalSection(Strict):
    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks, or the offline zagreus_* ones")
    num_fewshot: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict, description="per task, e.g. {m_mmlu_it: 5}")
    limit: int | None = Field(None, ge=1, description="items per task; None evaluates all")
    batch_size: int = Field(EVAL_BATCH_SIZE, ge=1, description="scoring packs batch_size x 256 tokens per forward")
    data_dir: str | None = Field(None, description="folder with the files of the offline zagreus_* tasks")
    quick_task: str | None = Field(None, description="multiple-choice task for zagreus.eval.run.quick_mc_eval "
                                                     "during pretraining (every pretrain.eval_every steps)")
    quick_limit: int = Field(200, ge=1, description="items of quick_task per quick eval")


# --- post-training --------------------------------------------------------------------------
class ChatDataset(Strict):
    name: str | None = None
    hub: str | None = None
    config: str | None = None
    split: str = "train"
    path: str | list[str] | None = None
    format: Literal["auto", "messages", "conversation", "prompt_completion", "preference"] = "auto"
    max_examples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_origin(self) -> "ChatDataset":
        if (self.hub is None) == (self.path is None):
            raise ValueError("set exactly one of hub: DATASET or path: FILE_OR_GLOB")
        return self

    def paths(self) -> list[str]:
        return as_paths(self.path)


class SFTSection(Strict):
    init: str | None = Field(None, description="checkpoint or export folder; default the run's last pretraining checkpoint")
    datasets: list[ChatDataset] = Field(default_factory=list)
    template: Literal["chatml", "llama3"] = "chatml"
    packing: bool = Field(True, description="several conversations per row with document masking; false pads one per row")
    seq_len: SeqLen = 4096
    micro_batch: int = Field(4, ge=1, description="rows per micro-batch on each rank; an optimizer step takes "
                                                  "micro_batch x grad_accum x data-parallel ranks rows")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step on each rank")
    epochs: int = Field(3, ge=1)
    seed: Seed = 0
    optimizer: OptimizerSection = OptimizerSection(lr=1e-3)
    schedule: ScheduleSection = ScheduleSection(kind="cosine", warmup=100)
    log_every: int = Field(10, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint: CheckpointSection = CheckpointSection(every=500, keep=2)
    tokenize_workers: int = Field(1, ge=1, description="processes each rank forks to tokenize the datasets the "
                                                       "first time (work units shared out; the same bytes whatever "
                                                       "the number)")
    parallel: ParallelSection = Field(ParallelSection(), description="parallelism under torchrun (dp_shard, "
                                                                     "dp_replicate, tp); pp is pretraining's only")
    max_bad_steps: int = Field(5, ge=1, description="non-finite steps in a row that stop the run")


class DPOSection(Strict):
    init: str | None = Field(None, description="SFT checkpoint or export folder; default the run's SFT result")
    datasets: list[ChatDataset] = Field(default_factory=list)
    template: Literal["chatml", "llama3"] = "chatml"
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO's -log sigmoid(beta h) on summed log-ratios; ipo: IPO's (h - 1/(2 beta))^2 "
                               "on per-token averaged log-ratios, as TRL computes it")
    beta: float = Field(0.1, gt=0, description="sigmoid: the strength of the pull towards the reference; ipo: the "
                                               "regularisation tau (the target margin is 1/(2 beta))")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid only: the assumed share of flipped "
                                                                  "preference labels (conservative DPO)")
    seq_len: SeqLen = 2048
    micro_batch: int = Field(4, ge=1, description="preference pairs per micro-batch on each rank; an optimizer step "
                                                  "takes micro_batch x grad_accum x data-parallel ranks pairs")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step on each rank")
    epochs: int = Field(1, ge=1)
    seed: Seed = 0
    optimizer: OptimizerSection = OptimizerSection(lr=5e-7, weight_decay=0.0)
    schedule: ScheduleSection = ScheduleSection(kind="cosine", warmup=10)
    log_every: int = Field(10, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint: CheckpointSection = CheckpointSection(every=500, keep=2)
    tokenize_workers: int = Field(1, ge=1, description="processes each rank forks to tokenize the datasets the "
                                                       "first time (work units shared out; the same bytes whatever "
                                                       "the number)")
    parallel: ParallelSection = Field(ParallelSection(), description="parallelism under torchrun (dp_shard, "
                                                                     "dp_replicate, tp); pp is pretraining's only")
    max_bad_steps: int = Field(5, ge=1, description="non-finite steps in a row that stop the run")

    @model_validator(mode="after")
    def _smoothing_is_sigmoids(self) -> "DPOSection":
        if self.loss != "sigmoid" and self.label_smoothing:
            raise ValueError(f"label_smoothing applies to loss: sigmoid only; remove it or set it to 0 for loss: {self.loss}")
        return self


# --- the recipe -----------------------------------------------------------------------------
class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="names the run directory runs/<name>")
    run_dir: str | None = Field(None, description="default runs/<name> under the current directory")
    tokenizer: TokenizerSection = TokenizerSection()
    data: DataSection | None = None
    model: ModelSection = ModelSection()
    pretrain: PretrainSection = PretrainSection()
    eval: EvalSection = EvalSection()
    sft: SFTSection | None = None
    dpo: DPOSection | None = None

    # Set by load_recipe: where the YAML lives, for resolving relative paths.
    source_path: Path | None = Field(None, exclude=True)

    def resolve_path(self, value: str) -> Path:
        p = Path(os.path.expandvars(os.path.expanduser(value)))
        if not p.is_absolute() and self.source_path is not None:
            p = self.source_path.parent / p
        return p

    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


def _location(loc: tuple) -> str:
    return ".".join(str(x) for x in loc if not str(x).startswith("function-after"))


def _model_in(annotation) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `X`, `X | None`, `list[X]` or `list[X] | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for arg in getattr(annotation, "__args__", ()) if (m := _model_in(arg)) is not None), None)


def _expected(model: type[BaseModel], loc: tuple) -> str:
    """The keys allowed where an unknown key was found, for the error line."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int):  # an index into a list of models
            continue
        field = current.model_fields.get(str(part)) if current is not None else None
        if field is None:
            return ""
        current = _model_in(field.annotation)
    if current is None:
        return ""
    keys = [k for k, f in current.model_fields.items() if not f.exclude]
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}allowed keys: {', '.join(keys)}"


def format_validation_error(path: Path, exc: ValidationError, model: type[BaseModel] = Recipe, prefix: str = "") -> str:
    """The one line for the first problem; `prefix` is where `model` sits in the recipe (e.g. model.overrides)."""
    errors = exc.errors()
    # A misspelt key also shows up as a missing one; the unknown key carries the "did you mean".
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    where = ".".join(part for part in (prefix, _location(err["loc"])) if part) or "(top level)"
    more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key '{where}'; {_expected(model, err['loc'])}{more}"
    if err["type"] == "missing":
        return f"{path}: missing required key '{where}'{more}"
    got = err.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    return f"{path}: key '{where}': {err['msg']}{got_text}{more}"


def _check_inputs(recipe: Recipe, path: Path) -> None:
    """Local files named by the recipe must exist now, not hours into a run."""
    if recipe.tokenizer.path is not None and not recipe.resolve_path(recipe.tokenizer.path).exists():
        raise UserError(f"{path}: key 'tokenizer.path': {recipe.tokenizer.path} does not exist; fix the path or use kind: llama3")
    groups: list[tuple[str, list[str]]] = []
    if recipe.data is not None:
        groups += [(f"data.sources.{s.name}.path", s.paths()) for s in recipe.data.sources]
    for section in ("sft", "dpo"):
        stage = getattr(recipe, section)
        if stage is not None:
            groups += [(f"{section}.datasets.{i}.path", d.paths()) for i, d in enumerate(stage.datasets)]
    for key, patterns in groups:
        for pattern in patterns:
            resolved = recipe.resolve_path(pattern)
            if not glob.glob(str(resolved)):
                raise UserError(f"{path}: key '{key}': no file matches {pattern} (looked for {resolved}); fix the path")


def load_recipe(path: str | Path, check_inputs: bool = True) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe not found; pass the path of a YAML recipe (see recipes/)")
    try:
        raw = yaml.safe_load(decode_utf8(path.read_bytes(), path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping with at least 'name:'")
    if "source_path" in raw:
        raise UserError(f"{path}: unknown key 'source_path'; it is set from where the recipe file is, remove it")
    try:
        recipe = Recipe(**raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(path, exc)) from None
    recipe.source_path = path.resolve()
    if check_inputs:
        _check_inputs(recipe, path)
    try:
        model = recipe.model.resolve()
    except UserError as exc:
        raise UserError(f"{path}: key 'model.preset': {exc}") from None
    except ValidationError as exc:
        raise UserError(format_validation_error(path, exc, ModelConfig, prefix="model.overrides")) from None
    _check_context(recipe, model, path)
    return recipe


def _check_context(recipe: Recipe, model: ModelConfig, path: Path) -> None:
    """Sequences of the stages that train the recipe's own model must fit its context (max_seq_len)."""
    stages = []
    if recipe.data is not None:  # a recipe without data does not pretrain
        stages.append(("pretrain", recipe.pretrain))
    # SFT starts from the run's pretrained model unless sft.init names another; DPO from SFT's unless dpo.init does.
    own_sft = recipe.sft is not None and recipe.sft.init is None
    if own_sft:
        stages.append(("sft", recipe.sft))
    if own_sft and recipe.dpo is not None and recipe.dpo.init is None:
        stages.append(("dpo", recipe.dpo))
    for name, section in stages:
        if section.seq_len > model.max_seq_len:
            raise UserError(f"{path}: key '{name}.seq_len': {section.seq_len} exceeds the model's context of "
                            f"{model.max_seq_len} tokens (max_seq_len); lower it or raise model.overrides.max_seq_len")


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe, defaults filled in, as written into every run directory."""
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude={"source_path"}), sort_keys=False, allow_unicode=True)
