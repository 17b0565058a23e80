"""Post-training (and continued pretraining) from Hugging Face weights, and `zagreus run` on a
post-training-only recipe.

A tiny LlamaForCausalLM built and saved by transformers (`save_pretrained`, with a
PreTrainedTokenizerFast around our trained BPE) is the `sft.init` of a real `zagreus sft` run: its
first logged loss (step 1, computed before the first update) equals the loss transformers computes
on the same batch. A starting model whose shape differs from the recipe's `model:` stops with one
line naming the key and both shapes. `pretrain.init` loads those weights for step 0. A recipe with
no data (sft + dpo + eval, like recipes/nesso-0.4b-*.yaml) runs through `zagreus run` to an eval
results file of its final model and a release folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_eval_lm import write_arc_task_files
from zagreus.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

QA = [("Qual è la capitale d'Italia?", "Roma."), ("What colour is the sky?", "Blue, on a clear day."),
      ("Quanto fa due più due?", "Quattro."), ("Who wrote the Divine Comedy?", "Dante Alighieri."),
      ("Come si chiama il gatto?", "Il gatto si chiama Nerone."), ("Name a prime number.", "Seven.")]
CHATS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
SHAPE = {"hidden_size": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 128,
         "max_seq_len": 256, "tie_embeddings": False, "norm_eps": 1e-6}  # LlamaConfig's rms_norm_eps
MODEL = {"preset": "tiny", "overrides": SHAPE}  # the recipe's model: the transformers model's shape


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """LlamaForCausalLM (random, seed 0) and its tokenizer, as transformers saves them."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from zagreus.tokenizer import BOS, EOS, train_bpe

    root = tmp_path_factory.mktemp("hf")
    tok = train_bpe([q + " " + a for q, a in QA] * 10, 400, root / "bpe")
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                         initializer_range=0.1)
    torch.manual_seed(0)
    folder = root / "llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_file=str(root / "bpe" / "tokenizer.json"), bos_token=BOS,
                            eos_token=EOS).save_pretrained(folder)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    return folder


def _write(tmp_path: Path, body: dict) -> Path:
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "hf-init", "run_dir": str(tmp_path / "run"), "pretrain": {"loss_chunk": 64},
                                    **body}, sort_keys=False))
    return path


def _sft(init: Path, **extra) -> dict:
    return {"init": str(init), "datasets": [{"path": "chat.jsonl"}], "packing": False, "seq_len": 128,
            "micro_batch": len(CHATS), "epochs": 2, "log_every": 1, "device": "cpu",
            "optimizer": {"lr": 1e-3}, "schedule": {"kind": "constant", "warmup": 0}, **extra}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_sft_from_a_transformers_folder_starts_at_transformers_loss(hf_folder, tmp_path):
    from transformers import LlamaForCausalLM

    from zagreus.post.chat import render
    from zagreus.tokenizer import load_tokenizer

    recipe = _write(tmp_path, {"model": MODEL, "sft": _sft(hf_folder)})
    result = subprocess.run([sys.executable, "-m", "zagreus.cli", "sft", str(recipe)], capture_output=True, text=True,
                            env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]

    # Step 1 holds every conversation (micro_batch = all of them, one step per epoch); its loss is the
    # mean over the assistant tokens, computed on the starting weights. transformers on the same batch:
    # labels -100 except on assistant tokens (transformers shifts them itself), padding masked out.
    tok = load_tokenizer(str(hf_folder))
    rendered = [render(c, tok, "chatml") for c in CHATS]
    T = max(len(r.ids) for r in rendered)
    input_ids = torch.zeros(len(CHATS), T, dtype=torch.long)
    attention = torch.zeros(len(CHATS), T, dtype=torch.long)
    labels = torch.full((len(CHATS), T), -100)
    for b, r in enumerate(rendered):
        n = len(r.ids)
        input_ids[b, :n] = torch.tensor(r.ids)
        attention[b, :n] = 1
        labels[b, :n] = torch.tensor([t if m else -100 for t, m in zip(r.ids, r.assistant_mask)])
    model = LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    with torch.no_grad():
        expected = float(model(input_ids=input_ids, attention_mask=attention, labels=labels).loss)
    assert abs(records[0]["loss"] - expected) < 1e-5, (records[0]["loss"], expected)
    assert records[0]["trained_tokens"] == int((labels[:, 1:] != -100).sum())
    summary = json.loads((tmp_path / "run" / "sft" / "summary.json").read_text())
    assert summary["finished"] and summary["init"] == str(hf_folder)
    # The fine-tune is a Hugging Face folder that transformers loads back.
    assert LlamaForCausalLM.from_pretrained(tmp_path / "run" / "sft" / "export").config.num_hidden_layers == 2


def test_a_starting_model_of_another_shape_is_one_line(hf_folder, tmp_path):
    from zagreus.post.dpo import run_dpo
    from zagreus.post.sft import run_sft
    from zagreus.recipe import load_recipe
    from zagreus.tokenizer import load_tokenizer

    wide = {"preset": "tiny", "overrides": {**SHAPE, "hidden_size": 128}}
    recipe = load_recipe(_write(tmp_path, {"model": wide, "sft": _sft(hf_folder)}))
    with pytest.raises(UserError) as info:
        run_sft(recipe)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"sft.init {hf_folder}: ")
    assert "hidden_size is 64 there but 128 in the recipe's model" in message
    vocab = load_tokenizer(str(hf_folder)).vocab_size
    assert f"tensor model.embed_tokens.weight is [{vocab}, 64] there, [{vocab}, 128] by the recipe" in message
    deep = {"preset": "tiny", "overrides": {**SHAPE, "n_layers": 3}}
    (tmp_path / "prefs.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    recipe = load_recipe(_write(tmp_path, {"model": deep, "dpo": {"init": str(hf_folder), "datasets": [
        {"path": "prefs.jsonl"}], "device": "cpu", "seq_len": 64}}))
    with pytest.raises(UserError) as info:
        run_dpo(recipe)
    assert "dpo.init" in str(info.value) and "num_hidden_layers in config.json) is 2 there but 3" in str(info.value)
    assert "tensor model.layers.2." in str(info.value) and "is absent there, [" in str(info.value)


def test_continued_pretraining_starts_at_transformers_loss(hf_folder, tmp_path):
    """`zagreus pretrain` with pretrain.init = the transformers folder: step 0 holds its weights, so the
    first logged loss is transformers' cross-entropy on the loader's first batch."""
    import shutil

    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from zagreus.data.loader import TokenLoader
    from zagreus.data.shards import ShardWriter, write_identity
    from zagreus.recipe import load_recipe
    from zagreus.tokenizer import load_tokenizer
    from zagreus.train.loop import run_pretrain

    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_folder / name, run / "tokenizer" / name)
    tok = load_tokenizer(str(run / "tokenizer"))
    writer = ShardWriter(run / "data" / "train" / "qa" / "00000.ds", tok.name, tok.vocab_size)
    for ids in tok.encode_batch([f"{q} {a}" for q, a in QA] * 4):
        writer.write([tok.bos_id] + ids)
    writer.close()
    write_identity(run / "data", tok.identity())
    recipe = load_recipe(_write(tmp_path, {"tokenizer": {"path": str(run / "tokenizer")}, "model": MODEL, "pretrain": {
        "init": str(hf_folder), "seq_len": 32, "micro_batch": 2, "steps": 2, "log_every": 1, "device": "cpu",
        "loss_chunk": 64, "peak_flops": 1e12, "optimizer": {"lr": 1e-3}, "schedule": {"kind": "constant", "warmup": 0},
        "checkpoint": {"every": 1, "keep": 1}}}))
    run_pretrain(recipe)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    p = recipe.pretrain
    batch = TokenLoader(run / "data", "train", p.seq_len, p.micro_batch, seed=p.seed, rank=0, world=1,
                        identity=tok.identity()).next_batch()
    model = LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch["input"]).logits
    expected = float(F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten()))
    assert first["step"] == 1 and abs(first["loss"] - expected) < 1e-5, (first["loss"], expected)
    # A resumed run continues from its checkpoint, not from pretrain.init again.
    recipe.pretrain.steps = 3
    run_pretrain(recipe)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_pretrain_init_must_have_the_recipes_shape_and_rope(hf_folder, tmp_path):
    from zagreus.model.llama import build_model
    from zagreus.recipe import load_recipe
    from zagreus.tokenizer import load_tokenizer
    from zagreus.train.loop import load_init_weights

    tok = load_tokenizer(str(hf_folder))
    recipe = load_recipe(_write(tmp_path, {"model": MODEL, "pretrain": {"init": str(hf_folder), "seq_len": 64}}))
    cfg = recipe.model.resolve(vocab_size=tok.vocab_size)
    # RoPE and the norms' epsilon too must be the recipe's: with others the same weights compute something else.
    for field, value, text in (("rope_theta", 500000.0, "rope_theta is 10000.0 there but 500000.0"),
                               ("norm_eps", 1e-5, "norm_eps (rms_norm_eps in config.json) is 1e-06 there but 1e-05")):
        other = cfg.model_copy(update={field: value})
        with pytest.raises(UserError) as info:
            load_init_weights(recipe, other, build_model(other, seed=5), whole=True)
        message = str(info.value)
        assert message.startswith(f"pretrain.init {hf_folder}: ") and text in message and "\n" not in message, message


def test_stage_plan_of_the_post_training_recipes():
    from zagreus.launch.pipeline import stage_commands
    from zagreus.recipe import load_recipe

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    expected = {"nesso-0.4b-instruct": ["sft", "dpo", "final-eval", "release"],
                "nesso-0.4b-agentic": ["sft", "final-eval", "release"],
                "open-zagreus-0.4b": ["sft", "final-eval", "release"]}
    for name, stages in expected.items():
        recipe = load_recipe(recipes / f"{name}.yaml", check_inputs=False)
        commands = dict(stage_commands(recipe, recipes / f"{name}.yaml"))
        assert list(commands) == stages, name
        final = "dpo" if "dpo" in stages else "sft"
        assert commands["final-eval"][:2] == ["eval", str(recipe.run_path() / final / "export")]
        assert commands["final-eval"][-2:] == ["--out", str(recipe.run_path() / "eval" / f"{final}.json")]


def test_run_on_a_post_training_only_recipe(hf_folder, tmp_path):
    write_arc_task_files(tmp_path / "arc", n_test=6, n_val=2)
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps({"prompt": q, "chosen": a, "rejected": "Non lo so."}) + "\n"
                                                  for q, a in QA))
    recipe = _write(tmp_path, {
        "model": MODEL, "sft": _sft(hf_folder),
        "dpo": {"datasets": [{"path": "prefs.jsonl"}], "seq_len": 128, "micro_batch": 3, "epochs": 1, "log_every": 1,
                "device": "cpu", "loss": "ipo"},
        "eval": {"tasks": ["zagreus_arc_it"], "limit": 4, "data_dir": "arc", "batch_size": 4}})
    result = subprocess.run([sys.executable, "-m", "zagreus.cli", "run", str(recipe)], capture_output=True, text=True,
                            env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    scores = json.loads((run / "eval" / "dpo.json").read_text())
    assert scores["tasks"]["zagreus_arc_it"]["samples"] == 4
    card = (run / "release" / "README.md").read_text()
    value = scores["tasks"]["zagreus_arc_it"]["value"]
    assert f"| zagreus_arc_it | {scores['tasks']['zagreus_arc_it']['metric']} | {value:.4f} | 4 |" in card
    assert "- SFT: " in card and "- DPO: " in card
    assert "fine-tuned with zagreus" in card and f"from {hf_folder}." in card and "from scratch" not in card
    # The release is DPO's model.
    assert (run / "release" / "model.safetensors").read_bytes() == (run / "dpo" / "export" / "model.safetensors").read_bytes()
    # Run again: every stage is done, the eval is not redone.
    before = (run / "eval" / "dpo.json").stat().st_mtime_ns
    result = subprocess.run([sys.executable, "-m", "zagreus.cli", "run", str(recipe)], capture_output=True, text=True,
                            env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "eval" / "dpo.json").stat().st_mtime_ns == before
    assert "stage final-eval:" in result.stderr and "skipped" in result.stderr


def test_model_card_names_the_weights_a_continued_pretraining_started_from(hf_folder, tmp_path):
    from zagreus.release.card import build_model_card
    from zagreus.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.recipe.write_text(yaml.safe_dump({"name": "cpt", "data": {"sources": [{"name": "it", "path": "x", "language": "it"}]},
                                          "pretrain": {"init": "/models/Llama-3.2-1B"}}))
    card = build_model_card(hf_folder, run)
    assert "A Llama-architecture decoder: /models/Llama-3.2-1B, pretrained further with zagreus" in card
    assert "on Italian." in card and "from scratch" not in card
