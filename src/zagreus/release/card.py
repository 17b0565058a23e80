"""The model card (README.md) of a release, built from the run's own records.

The card states only what the run directory records: the resolved recipe, the data manifest,
the checkpoint's meta.json, the post-training summaries and the evaluation progression.
Nothing is filled in by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from zagreus import __version__
from zagreus.data.shards import human
from zagreus.model.hf import from_llama_config
from zagreus.post.chat import saved_chat_template
from zagreus.rundir import POST_STAGES, RunDir, read_meta

LANGUAGE_NAMES = {"en": "English", "it": "Italian", "es": "Spanish", "fr": "French", "pt": "Portuguese"}
# FineWeb-2 style configs name languages by ISO 639-3.
ISO3_TO_1 = {"ita": "it", "spa": "es", "fra": "fr", "por": "pt", "eng": "en"}
ENGLISH_ONLY_HUBS = {"HuggingFaceFW/fineweb", "HuggingFaceFW/fineweb-edu"}


def _languages(recipe: dict) -> list[str]:
    """Languages of the training data, from the sources' `language` or hub config (e.g. ita_Latn)."""
    found: list[str] = []
    for source in (recipe.get("data") or {}).get("sources", []):
        code = (source.get("language") or ISO3_TO_1.get(str(source.get("config") or "").split("_")[0])
                or ("en" if source.get("hub") in ENGLISH_ONLY_HUBS else None))
        if code and code not in found:
            found.append(code)
    return found


def build_model_card(export_dir: Path, run: RunDir | None, repo_id: str | None = None,
                     post_stage: str | None = None) -> str:
    """The card of the export folder `export_dir`, made by `run` (None: a model of unknown origin).

    `post_stage` ("sft", "dpo" or None) is the post-training stage that made the model, so the
    card claims only what was done to it; `repo_id` names the hub repo in the usage snippet.
    """
    config = json.loads((export_dir / "config.json").read_text())
    recipe: dict = {}
    if run is not None and run.recipe.is_file():
        recipe = yaml.safe_load(run.recipe.read_text()) or {}
    name = repo_id or str(export_dir)
    languages = _languages(recipe)
    front = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": "apache-2.0",
        "tags": ["zagreus", "llama", "small-language-model"],
    }
    if languages:
        front["language"] = languages
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {repo_id or recipe.get('name') or export_dir.name}", ""]
    lang_text = " and ".join(LANGUAGE_NAMES.get(c, c) for c in languages) or "its training data"
    lines += [f"A Llama-architecture decoder trained from scratch with zagreus {__version__} on {lang_text}.", ""]

    cfg = from_llama_config(config, export_dir / "config.json")
    counts = cfg.param_counts()
    lines += ["## Model", "", "| | |", "|---|---|",
              f"| parameters | {counts['total']:,} ({counts['non_embedding']:,} non-embedding) |",
              f"| layers × hidden | {cfg.n_layers} × {cfg.hidden_size} |",
              f"| attention heads / KV heads | {cfg.n_heads} / {cfg.n_kv_heads} (head dim {cfg.head_dim}) |",
              f"| MLP (SwiGLU) | {cfg.intermediate_size} |",
              f"| vocabulary | {cfg.vocab_size:,} |",
              f"| context | {cfg.max_seq_len} tokens, RoPE θ {cfg.rope_theta:g} |",
              f"| tied embeddings | {'yes' if cfg.tie_embeddings else 'no'} |", ""]

    lines += _training_section(run, recipe)
    lines += _post_training_section(run, post_stage)
    lines += _data_section(run)
    lines += _eval_section(run)
    chat = saved_chat_template(export_dir)
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
              f'model = AutoModelForCausalLM.from_pretrained("{name}")']
    if chat:
        lines += ['ids = tokenizer.apply_chat_template([{"role": "user", "content": "Ciao!"}], add_generation_prompt=True, return_tensors="pt")']
    else:
        lines += ['ids = tokenizer("The capital of Italy is", return_tensors="pt").input_ids']
    lines += ["print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))", "```", "",
              f"or `zagreus chat {name}` / `zagreus serve {name}` for a terminal chat and an OpenAI-compatible server.", "",
              "## Limitations", "",
              "A small model: it makes factual mistakes, can produce biased or offensive text, and should "
              "not be relied on for advice. Evaluate it on your own task before use.", ""]
    return "\n".join(lines)


def _latest_meta(run: RunDir | None) -> dict:
    latest = run.latest_checkpoint() if run is not None else None
    return read_meta(latest) if latest is not None else {}


def _training_section(run: RunDir | None, recipe: dict) -> list[str]:
    meta = _latest_meta(run)
    pre = recipe.get("pretrain") or {}
    if not meta and not pre:
        return []
    out = ["## Training", ""]
    if meta:
        tokens = meta.get("tokens")
        out.append(f"- steps: {meta.get('step'):,}" + (f", tokens seen: {human(tokens)}" if tokens else ""))
        per_source = meta.get("tokens_per_source") or {}
        if per_source:
            out.append("- tokens per source: " + ", ".join(f"{k} {human(v)}" for k, v in per_source.items()))
        version = meta.get("code_version") or {}
        if version:
            out.append(f"- code: zagreus {version.get('zagreus')}, torch {version.get('torch')}"
                       + (f", git {version['git'][:12]}" if version.get("git") else ""))
    if pre:
        opt, sched = pre.get("optimizer", {}), pre.get("schedule", {})
        out.append(f"- sequence length {pre.get('seq_len')}, AdamW lr {opt.get('lr')} betas {opt.get('betas')} "
                   f"weight decay {opt.get('weight_decay')}, schedule {sched.get('kind')} (warmup {sched.get('warmup')})")
    return out + [""]


def _post_training_section(run: RunDir | None, post_stage: str | None) -> list[str]:
    """What `zagreus sft` / `zagreus dpo` recorded in their summary.json, for the stages the model went through."""
    if run is None or post_stage is None:
        return []
    out = []
    for stage in POST_STAGES[: POST_STAGES.index(post_stage) + 1]:
        facts = run.stage(stage).read_summary()
        if facts:
            kept = facts.get("data", {}).get("total", {}).get("kept")
            line = f"- {stage.upper()}: {facts.get('steps')} steps, {facts.get('epochs')} epochs on {kept} examples, template {facts.get('template')}"
            if stage == "sft" and "final_loss" in facts:
                line += f", final loss {facts['final_loss']:.4f}"
            final = facts.get("final") or {}
            if final:
                line += ", final " + ", ".join(f"{k} {v:.4f}" for k, v in final.items())
            out.append(line)
    return ["## Post-training", "", *out, ""] if out else []


def _data_section(run: RunDir | None) -> list[str]:
    if run is None or not run.manifest.is_file():
        return []
    manifest = json.loads(run.manifest.read_text())
    sources = manifest.get("sources", {})
    out = ["## Data", "", "| source | origin | weight | training documents | training tokens |", "|---|---|---|---|---|"]
    for name, info in sources.items():
        train = info["train"]
        out.append(f"| {name} | {info.get('origin', '')} | {info.get('weight', '')} | {train['docs']:,} | {train['tokens']:,} |")
    return out + [""]


def _eval_section(run: RunDir | None) -> list[str]:
    progression = run.progression() if run is not None else None
    if progression is None or not progression.is_file():
        return []
    return ["## Evaluation", "", "Scores by checkpoint (lm-evaluation-harness, `zagreus eval --every-checkpoint`):", "",
            progression.read_text().strip(), ""]
