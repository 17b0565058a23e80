"""`zagreus run` end to end on a small recipe the test writes: data -> pretrain -> sft -> dpo ->
release, then the release folder loads in transformers and its model card states the numbers the
run recorded; `zagreus export` writes RUN_DIR/exports/step-N on demand."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from zagreus.launch.pipeline import stage_commands
from zagreus.recipe import load_recipe

WORDS = "il gatto dorme sul divano mentre la volpe corre nel bosco the cat sleeps on the sofa while a fox runs".split()


def _write_inputs(tmp_path):
    rng = random.Random(0)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(120):
            f.write(json.dumps({"id": i, "text": " ".join(rng.choice(WORDS) for _ in range(120)) + f" {i}."}) + "\n")
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in [("Dove dorme il gatto?", "Sul divano."), ("Where does the fox run?", "In the woods.")]]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (tmp_path / "prefs.jsonl").write_text(json.dumps({"prompt": "Dove dorme il gatto?", "chosen": "Sul divano.",
                                                      "rejected": "Nel bosco."}) + "\n")


RECIPE = """
name: mini
run_dir: {run_dir}
tokenizer: {{train: {{vocab_size: 400}}}}
data:
  sources: [{{name: docs, path: docs.jsonl}}]
  filters: {{min_chars: 10, quality: false, dedup: exact}}
  validation_fraction: 0.1
  executor: {{workers: 1}}
model: {{preset: tiny, overrides: {{hidden_size: 64, n_layers: 2, n_heads: 2, n_kv_heads: 1, intermediate_size: 128, max_seq_len: 128}}}}
pretrain:
  seq_len: 64
  micro_batch: 4
  steps: 12
  schedule: {{kind: wsd, warmup: 2, decay: 4}}
  checkpoint: {{every: 6, keep: 2}}
  log_every: 3
  eval_every: 6
  eval_batches: 2
sft:
  datasets: [{{path: chat.jsonl}}]
  seq_len: 64
  micro_batch: 2
  epochs: 2
  schedule: {{kind: cosine, warmup: 1}}
dpo:
  datasets: [{{path: prefs.jsonl}}]
  seq_len: 64
  micro_batch: 1
  epochs: 1
"""


def test_stage_plan(tmp_path):
    _write_inputs(tmp_path)
    (tmp_path / "mini.yaml").write_text(RECIPE.format(run_dir=tmp_path / "run"))
    recipe = load_recipe(tmp_path / "mini.yaml")
    assert [s for s, _ in stage_commands(recipe, tmp_path / "mini.yaml")] == ["data", "pretrain", "sft", "dpo", "release"]
    post_only = recipe.model_copy(update={"data": None})
    assert [s for s, _ in stage_commands(post_only, tmp_path / "mini.yaml")] == ["sft", "dpo", "release"]


def test_run_end_to_end_and_release(tmp_path):
    _write_inputs(tmp_path)
    run_dir = tmp_path / "run"
    recipe = tmp_path / "mini.yaml"
    recipe.write_text(RECIPE.format(run_dir=run_dir))
    result = subprocess.run([sys.executable, "-m", "zagreus.cli", "run", str(recipe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    meta = json.loads((run_dir / "checkpoints" / "step-000012" / "meta.json").read_text())
    assert meta["step"] == 12 and meta["tokens"] == 12 * 4 * 64
    # The chain writes no exports (nothing reads them); `zagreus export RUN_DIR` writes the latest on demand.
    assert not (run_dir / "exports").exists()
    result = subprocess.run([sys.executable, "-m", "zagreus.cli", "export", str(run_dir)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"wrote {run_dir / 'exports' / 'step-000012'}"
    # That export and the release (DPO's model) both load in transformers as-is.
    for folder in (run_dir / "exports" / "step-000012", run_dir / "release"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer("il gatto dorme", return_tensors="pt").input_ids
        assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
    card = (run_dir / "release" / "README.md").read_text()
    assert "- steps: 12, tokens seen: 3.07K" in card
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    train = manifest["sources"]["docs"]["train"]
    assert f"| docs | docs.jsonl | 1.0 | {train['docs']:,} | {train['tokens']:,} |" in card
    assert "- SFT: " in card and "- DPO: " in card
    # Releasing the run directory ships the last model it made: DPO's.
    assert (run_dir / "release" / "model.safetensors").read_bytes() == (run_dir / "dpo" / "export" / "model.safetensors").read_bytes()
    # The released model is DPO's, with the chat template, so apply_chat_template works from the hub folder.
    rendered = AutoTokenizer.from_pretrained(run_dir / "release").apply_chat_template(
        [{"role": "user", "content": "ciao"}], add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")


def test_failed_upload_is_one_line_and_keeps_the_folder(tmp_path):
    from zagreus.model.config import resolve_model_config
    from zagreus.model.llama import Transformer
    from zagreus.model.hf import save_hf
    from zagreus.tokenizer import train_bpe

    tok = train_bpe([" ".join(WORDS)] * 20, 300, tmp_path / "tok")
    model = Transformer(resolve_model_config("tiny", vocab_size=tok.vocab_size, n_layers=1))
    model.init_weights(0)
    save_hf(model, tok, tmp_path / "export")
    out = tmp_path / "release"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "zagreus.cli", "release", str(tmp_path / "export"), "--out", str(out),
                             "--push", "someone/model"], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "upload to someone/model failed" in errors[0] and str(out) in errors[0]
    assert "Traceback" not in result.stderr
    card = (out / "README.md").read_text()
    assert "| parameters | " in card and f"{model.cfg.param_counts()['total']:,}" in card
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
