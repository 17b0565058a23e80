"""`zagreus eval` on any Hugging Face causal LM: what zagreus' loader opens gets the fast scorer,
anything else (here a tiny Qwen2 built by transformers) lm-eval's HFLM, with the same results format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_eval_lm import build_export
from test_eval_progression import data_dir, tokenizer_dir  # noqa: F401  (fixtures: a small BPE, 8 ARC items)

from zagreus.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer Qwen2 of width 32 saved by transformers, with our trained BPE beside it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from zagreus.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    cfg = Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, initializer_range=0.2, tie_word_embeddings=True)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("qwen2")
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def test_backend_follows_config(tmp_path, tokenizer_dir, qwen_dir):
    from zagreus.eval.backend import backend_of

    export = build_export(tmp_path / "export", tokenizer_dir)
    assert backend_of(export) == "zagreus" and backend_of(str(export)) == "zagreus"
    assert backend_of(qwen_dir) == "hf"
    assert backend_of("Qwen/Qwen3-0.6B") == "hf" and backend_of(Path("LiquidAI/LFM2-350M")) == "hf"
    assert backend_of("gpt2") == "hf"

    # A Llama folder made elsewhere: ours while our loader reads it, HFLM's once it has what ours lacks.
    config = json.loads((export / "config.json").read_text())
    del config["zagreus_version"]
    (export / "config.json").write_text(json.dumps(config))
    assert backend_of(export) == "zagreus"
    for change in ({"attention_bias": True}, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                   {"architectures": ["LlamaForSequenceClassification"]}):
        (export / "config.json").write_text(json.dumps({**config, **change}))
        assert backend_of(export) == "hf", change

    with pytest.raises(UserError, match="no such file or folder, and not a hub id"):
        backend_of(tmp_path / "runs" / "missing" / "exports")
    with pytest.raises(UserError, match="neither an export folder"):
        backend_of(tmp_path)  # a folder that is no model at all


def test_any_hf_model_scores_as_hflm(qwen_dir, data_dir, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from zagreus.eval.compare import compare
    from zagreus.eval.run import evaluate, run_tasks, write_results

    results = evaluate(qwen_dir, ["zagreus_arc_it"], num_fewshot=1, batch_size=4, data_dir=data_dir, device="cpu")
    assert results["backend"] == "hf" and results["tiebreak"] is None
    entry = results["tasks"]["zagreus_arc_it"]
    assert entry["metric"] == "acc_norm" and entry["samples"] == 8 and entry["num_fewshot"] == 1
    assert "rescored" not in entry

    direct, raw = run_tasks(HFLM(pretrained=str(qwen_dir), batch_size=4, device="cpu"), ["zagreus_arc_it"],
                            num_fewshot=1, data_dir=data_dir)
    assert raw["tiebreak"] is None
    for metric in ("acc", "acc_norm"):
        assert entry["metrics"][metric] == direct["zagreus_arc_it"]["metrics"][metric]

    # The results file is the usual one: `zagreus compare` reads it, labelled by the folder's name.
    write_results(results, tmp_path / "qwen.json")
    compare([tmp_path / "qwen.json"], tmp_path / "cmp")
    assert f"| {qwen_dir.name} | {entry['value']:.4f} |" in (tmp_path / "cmp" / "compare.md").read_text()


def test_bad_hf_model_is_one_line(tmp_path, data_dir):
    from zagreus.eval.run import evaluate

    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no_such_architecture", "architectures": ["X"]}))
    with pytest.raises(UserError) as err:
        evaluate(folder, ["zagreus_arc_it"], limit=2, data_dir=data_dir, device="cpu")
    assert str(folder) in str(err.value) and "\n" not in str(err.value)
