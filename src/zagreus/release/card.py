"""The model card (README.md) of a release, built from the run's own records.

The card states only what the run directory records: the resolved recipe, the data manifest,
the checkpoint's meta.json, the post-training summaries and the evaluation tables in eval/
(progression, comparison with other models, base against fine-tune).
Nothing is filled in by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from zagreus import __version__
from zagreus.data.shards import human
from zagreus.model.hf import from_llama_config
from zagreus.post.chat import saved_chat_template, template_of
from zagreus.rundir import POST_STAGES, RunDir, read_meta

LANGUAGE_NAMES = {"en": "English", "it": "Italian", "es": "Spanish", "fr": "French", "pt": "Portuguese"}
# FineWeb-2 style configs name languages by ISO 639-3.
ISO3_TO_1 = {"ita": "it", "spa": "es", "fra": "fr", "por": "pt", "eng": "en"}
ENGLISH_ONLY_HUBS = {"HuggingFaceFW/fineweb", "HuggingFaceFW/fineweb-edu"}
LICENSE = "apache-2.0"  # the card's front matter and the GGUF's general.license
LISTING = "gguf.json"  # a release folder's GGUF files: [{file, quant, bytes, sha256}], written by release.gguf


def run_recipe(run: RunDir | None) -> dict:
    """The resolved recipe of `run` ({} for a model of unknown origin)."""
    if run is None or not run.recipe.is_file():
        return {}
    return yaml.safe_load(run.recipe.read_text()) or {}


def languages(recipe: dict) -> list[str]:
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
    recipe = run_recipe(run)
    name = repo_id or str(export_dir)
    codes = languages(recipe)
    front = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": LICENSE,
        "tags": ["zagreus", "llama", "small-language-model"],
    }
    if codes:
        front["language"] = codes
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {repo_id or recipe.get('name') or export_dir.name}", ""]
    lang_text = " and ".join(LANGUAGE_NAMES.get(c, c) for c in codes) or "its training data"
    base = _post_training_base(run, recipe, post_stage)
    continued = (recipe.get("pretrain") or {}).get("init") if recipe.get("data") else None
    if base is not None:  # a post-training-only run: the weights came from elsewhere
        lines += [f"A Llama-architecture decoder fine-tuned with zagreus {__version__} from {base}.", ""]
    elif continued:
        lines += [f"A Llama-architecture decoder: {continued}, pretrained further with zagreus {__version__} on "
                  f"{lang_text}.", ""]
    else:
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
    lines += _eval_section(run, post_stage)
    chat = saved_chat_template(export_dir)
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
              f'model = AutoModelForCausalLM.from_pretrained("{name}")']
    if chat:
        lines += ['ids = tokenizer.apply_chat_template([{"role": "user", "content": "Ciao!"}], add_generation_prompt=True, return_tensors="pt")']
    else:
        lines += ['ids = tokenizer("The capital of Italy is", return_tensors="pt").input_ids']
    lines += ["print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))", "```", "",
              f"or `zagreus chat {name}` / `zagreus serve {name}` for a terminal chat and an OpenAI-compatible server.", ""]
    lines += _gguf_section(export_dir, repo_id or recipe.get("name") or export_dir.name)
    lines += [
              "## Limitations", "",
              "A small model: it makes factual mistakes, can produce biased or offensive text, and should "
              "not be relied on for advice. Evaluate it on your own task before use.", ""]
    return "\n".join(lines)


def read_listing(folder: Path) -> list[dict]:
    """The GGUF files LISTING names in a release folder ([] when it has none)."""
    path = Path(folder) / LISTING
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


# Ollama's Go templates for our two chat formats (those of its library's ChatML and Llama-3 models),
# rendering as post.chat.render does; llama.cpp adds the BOS itself.
OLLAMA_TEMPLATES = {
    "chatml": ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
               '<|im_start|>assistant\n', "<|im_end|>"),
    "llama3": ('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
               '{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n', "<|eot_id|>"),
}


def _gguf_section(export_dir: Path, name: str) -> list[str]:
    """The GGUF files of the release, with how to run them in llama.cpp and Ollama."""
    files = read_listing(export_dir)
    if not files:
        return []
    first = files[0]["file"]
    out = ["## GGUF (llama.cpp, Ollama, LM Studio)", "", "| file | weights | size | sha256 |", "|---|---|---|---|"]
    out += [f"| {f['file']} | {f['quant']} | {human(f['bytes'])}B | `{f['sha256']}` |" for f in files]
    template = template_of(export_dir, None) if saved_chat_template(export_dir) else None
    out += ["", "With llama.cpp (`llama-cli` and `llama-server` from its releases or a build):", "", "```"]
    if template:
        out += [f"llama-cli -m {first} -cnv        # a terminal chat, with the chat template the file carries",
                f"llama-server -m {first} --jinja  # an OpenAI-compatible server on port 8080"]
    else:
        out += [f'llama-cli -m {first} -no-cnv -n 64 -p "The Debian package manager"',
                f"llama-server -m {first}          # /completion and /v1/completions on port 8080"]
    out += ["```", "", "With Ollama, a `Modelfile` beside the file:", "", "```", f"FROM ./{first}"]
    if template:
        body, stop = OLLAMA_TEMPLATES[template]
        out += [f'TEMPLATE """{body}"""', f'PARAMETER stop "{stop}"']
    else:
        out += ['TEMPLATE """{{ .Prompt }}"""']
    out += ["```", "", "```", f"ollama create {name.replace('/', '-').lower()} -f Modelfile",
            f"ollama run {name.replace('/', '-').lower()}", "```", "",
            f"In this folder, `zagreus chat . --gguf {first}` runs it through llama-cpp-python with zagreus' chat loop.", ""]
    return out


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


def _post_training_base(run: RunDir | None, recipe: dict, post_stage: str | None) -> str | None:
    """The model a run that did not pretrain started post-training from (its first stage's init), else None."""
    if run is None or post_stage is None or recipe.get("data") or run.latest_checkpoint() is not None:
        return None
    first = next((stage for stage in POST_STAGES if run.stage(stage).read_summary()), None)
    return run.stage(first).read_summary().get("init") if first is not None else None


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


def _model_scores(run: RunDir, post_stage: str | None) -> list[str]:
    """The released model's own scores, when `zagreus run` evaluated the post-training export it ships."""
    path = run.stage_eval(post_stage) if post_stage is not None else None
    if path is None or not path.is_file():
        return []
    tasks = (json.loads(path.read_text(encoding="utf-8")).get("tasks") or {}).items()
    rows = [f"| {task} | {entry.get('metric')} | {entry['value']:.4f} | {entry.get('samples')} |"
            for task, entry in tasks if isinstance(entry.get("value"), (int, float))]
    return ["This model (lm-evaluation-harness, `zagreus eval`):", "", "| task | metric | score | items |",
            "|---|---|---|---|", *rows, ""] if rows else []


def _eval_section(run: RunDir | None, post_stage: str | None = None) -> list[str]:
    """The evaluation tables the run holds: the released model's scores, progression by checkpoint,
    comparison with other models, base vs fine-tune."""
    if run is None:
        return []
    out = _model_scores(run, post_stage)
    tables = [(run.progression(), "Scores by checkpoint (lm-evaluation-harness, `zagreus eval --every-checkpoint`):"),
              (run.comparison(), "Against other models (`zagreus compare --run`):"),
              (run.delta(), "Base model against its fine-tune, task by task (`zagreus compare --delta --run`):")]
    for path, intro in tables:
        if path.is_file():
            out += [intro, "", path.read_text(encoding="utf-8").strip(), ""]
    return ["## Evaluation", "", *out] if out else []
