"""SFT and DPO on tiny models: packing equals one-by-one, DPO loss equals a hand computation,
a short SFT run answers its trained prompts, dataset formats and skip counts, recipes check."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from zagreus.post.chat import render, stop_token_ids

QA = [
    ("Qual è la capitale d'Italia?", "Roma."),
    ("What colour is the sky?", "Blue, on a clear day."),
    ("Quanto fa due più due?", "Quattro."),
    ("Who wrote the Divine Comedy?", "Dante Alighieri."),
    ("Come si chiama il gatto?", "Il gatto si chiama Nerone."),
    ("Name a prime number.", "Seven."),
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
          "properties": {"city": {"type": "string"}}}}}]
TOOL_CONV = [
    {"role": "user", "content": "Che tempo fa a Roma?"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Roma"}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "Ci sono 21 gradi."},
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from zagreus.post.chat import TOOLS_POSTAMBLE, TOOLS_PREAMBLE
    from zagreus.tokenizer import train_bpe

    texts = [q + " " + a for q, a in QA] * 10 + [TOOLS_PREAMBLE + json.dumps(TOOLS) + TOOLS_POSTAMBLE] * 10
    return train_bpe(texts, 600, tmp_path_factory.mktemp("bpe"))


def _model(tok, seed: int = 0):
    from zagreus.model.config import resolve_model_config
    from zagreus.model.llama import Transformer

    cfg = resolve_model_config("tiny", vocab_size=tok.vocab_size, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               intermediate_size=128, max_seq_len=512, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = Transformer(cfg)
    model.init_weights(seed)
    return model


@pytest.fixture(scope="module")
def init_export(tok, tmp_path_factory):
    from zagreus.model.hf import save_hf

    torch.manual_seed(0)
    return save_hf(_model(tok, seed=0), tok, tmp_path_factory.mktemp("init") / "export")


def _conversations() -> list[list[dict]]:
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA[:3]] + [TOOL_CONV]


def test_packed_batch_equals_one_by_one(tok):
    from zagreus.post.common import to_sequence
    from zagreus.post.sft import make_batch, pack, token_losses

    torch.manual_seed(0)
    model = _model(tok, seed=1)
    seqs = []
    for conv in _conversations():
        r = render(conv, tok, "chatml", tools=TOOLS if conv is TOOL_CONV else None)
        seqs.append(to_sequence(r.ids, r.assistant_mask, 512)[0])
    assert pack([len(s) for s in seqs], 512).tolist() == [0, 4]  # all four share one row
    assert pack([300, 200, 100, 400, 512], 512).tolist() == [0, 2, 4, 5]  # next-fit: 300+200, 100+400, 512
    packed = make_batch([seqs] + [[seqs[0]]], pad=0, device=torch.device("cpu"), packing=True)
    assert packed.mask.shape == (2, 1, packed.tokens.shape[1], packed.tokens.shape[1])
    with torch.no_grad():
        packed_losses = token_losses(model, packed, chunk_tokens=7)
        single = make_batch([[s] for s in seqs], pad=0, device=torch.device("cpu"), packing=False)
        single_losses = token_losses(model, single, chunk_tokens=7)
    for d, s in enumerate(seqs):
        in_row = packed_losses[0][packed.doc[0] == d]
        alone = single_losses[d, : len(s)]
        assert torch.allclose(in_row, alone, atol=1e-5, rtol=0)
        # And against plain logits + cross-entropy of the conversation on its own.
        with torch.no_grad():
            logits = model(torch.tensor([s.ids]))[0]
        ref = F.cross_entropy(logits, torch.tensor(s.labels), ignore_index=-100, reduction="sum")
        assert abs(float(in_row.sum()) - float(ref)) < 1e-4 * max(1.0, float(ref))
        assert float(in_row.sum()) > 0
    # The second row (a lone conversation + padding) gives the same losses too.
    assert torch.allclose(packed_losses[1][packed.doc[1] == 0], single_losses[0, : len(seqs[0])], atol=1e-5, rtol=0)


def _hand_logprob(model, ids: list[int], trained: list[bool]) -> float:
    """Sum of log p(token t | tokens < t) over trained tokens t, from plain logits."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if trained[t])


def test_dpo_loss_equals_hand_computation(tok):
    from zagreus.post.datasets import preference_example
    from zagreus.post.common import Sequence
    from zagreus.post.dpo import Pair, dpo_loss, pair_batch, pair_encoder, sequence_logprobs

    policy, reference = _model(tok, seed=3), _model(tok, seed=4)
    rows = [{"prompt": "Qual è la capitale d'Italia?", "chosen": "Roma.", "rejected": "Milano, credo."},
            {"prompt": [{"role": "system", "content": "Rispondi breve."}, {"role": "user", "content": "Due più due?"}],
             "chosen": [{"role": "assistant", "content": "Quattro."}], "rejected": [{"role": "assistant", "content": "Cinque."}]}]
    beta = 0.1
    examples = [preference_example(r, f"row {i}") for i, r in enumerate(rows)]
    encode = pair_encoder(tok, "chatml", 256)
    pairs = [Pair(*(Sequence(*seq) for seq in encode(ex)[0])) for ex in examples]
    tokens, labels = pair_batch(pairs, pad=0, device=torch.device("cpu"))
    with torch.no_grad():
        pol = sequence_logprobs(policy, tokens, labels, chunk_tokens=5)
        ref = sequence_logprobs(reference, tokens, labels, chunk_tokens=5)
    loss, chosen_r, rejected_r = dpo_loss(pol[:2], pol[2:], ref[:2], ref[2:], beta)

    for i, ex in enumerate(examples):
        prompt_len = len(render(ex.prompt, tok, "chatml").ids)
        hand = {}
        for side in ("chosen", "rejected"):
            full = render(ex.prompt + getattr(ex, side), tok, "chatml")
            trained = [m and t >= prompt_len for t, m in enumerate(full.assistant_mask)]
            # The completion is the assistant content plus <|im_end|>, nothing of the prompt.
            assert tok.decode([x for x, m in zip(full.ids, trained) if m]) == getattr(ex, side)[0]["content"] + "<|im_end|>"
            hand[side] = (_hand_logprob(policy, full.ids, trained), _hand_logprob(reference, full.ids, trained))
        margin = beta * ((hand["chosen"][0] - hand["chosen"][1]) - (hand["rejected"][0] - hand["rejected"][1]))
        hand_loss = -math.log(1.0 / (1.0 + math.exp(-margin)))
        assert abs(float(loss[i]) - hand_loss) < 1e-5
        assert abs(float(chosen_r[i]) - beta * (hand["chosen"][0] - hand["chosen"][1])) < 1e-5
        assert abs(float(rejected_r[i]) - beta * (hand["rejected"][0] - hand["rejected"][1])) < 1e-5
        assert abs(float(pol[i]) - hand["chosen"][0]) < 1e-4
    assert float(loss.mean()) != pytest.approx(math.log(2), abs=1e-4)  # different models: not the trivial value


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def _recipe(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    # The model the tests start from (_model): the recipe's model must have its shape.
    model = {"preset": "tiny", "overrides": {"hidden_size": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                             "intermediate_size": 128, "max_seq_len": 512}}
    path.write_text(yaml.safe_dump({"name": "post-test", "run_dir": str(tmp_path / "run"), "model": model,
                                    **body}, sort_keys=False))
    return path


def test_sft_run_learns_answers_and_counts_skips(tok, init_export, tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zagreus.model.generate import SamplingParams, generate
    from zagreus.checkpoint import load_model_and_tokenizer
    from zagreus.post.sft import run_sft
    from zagreus.recipe import load_recipe

    # Half the pairs as `messages` jsonl (plus a tool conversation, a row with no assistant turn and a
    # broken line), the other half as an OpenItalianData-style parquet `conversation` column.
    msgs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA[:3]]
    msgs += [{"messages": TOOL_CONV, "tools": json.dumps(TOOLS)},
             {"messages": [{"role": "user", "content": "nessuna risposta"}]}, "{broken json"]
    _write_jsonl(tmp_path / "chat.jsonl", msgs)
    pq.write_table(pa.table({"conversation": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                                              for q, a in QA[3:]]}), tmp_path / "oid.parquet")
    recipe = load_recipe(_recipe(tmp_path, {"pretrain": {"loss_chunk": 64}, "sft": {
        "init": str(init_export), "seq_len": 512, "micro_batch": 2, "epochs": 80, "log_every": 10,
        "datasets": [{"path": "chat.jsonl"}, {"path": "oid.parquet", "format": "conversation"}],
        "optimizer": {"lr": 3e-3, "weight_decay": 0.0}, "schedule": {"kind": "constant", "warmup": 5},
        "device": "cpu"}}))
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="zagreus.post.datasets"):
        export_dir = run_sft(recipe)
    assert any("chat.jsonl:6" in r.getMessage() and "1 malformed" in r.getMessage() for r in caplog.records)
    summary = json.loads((tmp_path / "run" / "sft" / "summary.json").read_text())
    assert summary["data"]["total"] == {"rows": 9, "kept": 7, "skipped_no_assistant": 1, "skipped_malformed": 1}
    assert summary["rows"] == 1 and summary["steps"] == 80  # seven conversations packed into one row
    records = [json.loads(line) for line in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(10, 81, 10))
    assert records[-1]["loss"] < 0.2 < 1.0 < records[0]["loss"]

    cfg = json.loads((export_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in cfg["chat_template"]
    gen_cfg = json.loads((export_dir / "generation_config.json").read_text())
    model, tok2 = load_model_and_tokenizer(export_dir)
    assert gen_cfg["eos_token_id"] == stop_token_ids(tok2, "chatml")
    for q, a in QA:
        prompt = render([{"role": "user", "content": q}], tok2, "chatml", add_generation_prompt=True).ids
        out = generate(model, prompt, SamplingParams(max_new_tokens=30, stop_ids=stop_token_ids(tok2, "chatml")))
        assert tok2.decode(out) == a
    # Finished runs are not redone unless forced.
    assert run_sft(recipe) == export_dir


def test_dpo_run_logs_rewards_and_uses_reference_once(tok, init_export, tmp_path):
    from zagreus.checkpoint import load_model_and_tokenizer
    from zagreus.post.dpo import run_dpo
    from zagreus.recipe import load_recipe

    rows = [{"prompt": q, "chosen": a, "rejected": "Non lo so."} for q, a in QA[:4]]
    rows += [{"chosen": [{"role": "user", "content": QA[4][0]}, {"role": "assistant", "content": QA[4][1]}],
              "rejected": [{"role": "user", "content": QA[4][0]}, {"role": "assistant", "content": "Boh."}]},
             {"prompt": "x", "chosen": [{"role": "user", "content": "y"}], "rejected": "z"}]
    _write_jsonl(tmp_path / "prefs.jsonl", rows)
    recipe = load_recipe(_recipe(tmp_path, {"dpo": {
        "init": str(init_export), "beta": 0.5, "seq_len": 128, "micro_batch": 2, "epochs": 6, "log_every": 1,
        "datasets": [{"path": "prefs.jsonl"}], "optimizer": {"lr": 3e-3, "weight_decay": 0.0},
        "schedule": {"kind": "constant", "warmup": 0}, "device": "cpu"}}))
    run_dpo(recipe)
    out = tmp_path / "run" / "dpo"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["total"] == {"rows": 6, "kept": 5, "skipped_no_assistant": 1, "skipped_malformed": 0}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == summary["steps"] == 18
    first, last = records[0], records[-1]
    # Step 1 runs the starting model against itself: rewards 0, loss log 2.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards_chosen"] == pytest.approx(0.0, abs=1e-5) and first["margins"] == pytest.approx(0.0, abs=1e-5)
    assert last["accuracy"] == 1.0 and last["margins"] > 1.0 and last["loss"] < 0.5
    assert last["margins"] == pytest.approx(last["rewards_chosen"] - last["rewards_rejected"], abs=1e-6)
    # The reference log-probabilities are those of the starting model, computed by hand here.
    init_model, _ = load_model_and_tokenizer(init_export)
    from zagreus.post.datasets import preference_example

    hand = []
    for i, row in enumerate(rows[:5]):
        ex = preference_example(row, str(i))
        prompt_len = len(render(ex.prompt, tok, "chatml").ids)
        full = render(ex.prompt + ex.chosen, tok, "chatml")
        hand.append(_hand_logprob(init_model, full.ids, [m and t >= prompt_len for t, m in enumerate(full.assistant_mask)]))
    assert summary["reference_logprobs_mean"]["chosen"] == pytest.approx(sum(hand) / len(hand), abs=1e-4)
    assert (out / "export" / "model.safetensors").is_file()


def test_dataset_formats(tmp_path, caplog):
    from zagreus.recipe import ChatDataset

    rows = [
        {"prompt": "Ciao", "completion": "Ciao a te."},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello."}],
         "system": "Be brief."},
        {"conversations": [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Hey there."}]},
        {"messages": [{"role": "user", "content": "Tempo?"},
                      {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                                           "arguments": "{\"city\": \"Roma\"}"}}]}],
         "tools": TOOLS},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "wizard", "content": "?"}]},
        {"text": "no known columns"},
        "[1, 2",
    ]
    _write_jsonl(tmp_path / "mix.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="zagreus.post.datasets"):
        examples, stats = load_examples(ChatDataset(path=str(tmp_path / "mix.jsonl")), Path, "sft")
    assert (stats.rows, stats.kept, stats.no_assistant, stats.malformed) == (8, 4, 1, 3)
    assert stats.first_problems[0].startswith(f"{tmp_path / 'mix.jsonl'}:6: message 0: role 'wizard'")
    assert stats.first_problems[1].startswith(f"{tmp_path / 'mix.jsonl'}:7: cannot tell the format")
    assert stats.first_problems[2].startswith(f"{tmp_path / 'mix.jsonl'}:8: not valid JSON")
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "3 malformed row(s)" in warning[0]
    assert examples[0].messages == [{"role": "user", "content": "Ciao"}, {"role": "assistant", "content": "Ciao a te."}]
    assert examples[1].messages[0] == {"role": "system", "content": "Be brief."}
    assert examples[2].messages == [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Hey there."}]
    assert examples[3].tools == TOOLS
    assert examples[3].messages[1]["tool_calls"] == [{"name": "get_weather", "arguments": "{\"city\": \"Roma\"}"}]


@pytest.mark.parametrize("name", ["nesso-0.4b-instruct", "nesso-0.4b-agentic", "open-zagreus-0.4b"])
def test_post_training_recipes_check(name):
    from typer.testing import CliRunner

    from zagreus.cli import app

    path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml"
    result = CliRunner().invoke(app, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert "sft" in result.output


def test_sft_starts_from_the_runs_latest_checkpoint_by_default(tok, tmp_path):
    from zagreus.model.hf import load_hf
    from zagreus.post.sft import run_sft
    from zagreus.recipe import load_recipe
    from zagreus.checkpoint import save_checkpoint

    base = _model(tok, seed=7)
    run_dir = tmp_path / "run"
    tok.save(run_dir / "tokenizer")
    save_checkpoint(run_dir / "checkpoints", 10, _model(tok, seed=8), None, {"model_config": base.cfg.model_dump()})
    save_checkpoint(run_dir / "checkpoints", 20, base, None, {"model_config": base.cfg.model_dump()})
    _write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "completion": a} for q, a in QA])
    # lr 0: the export must hold exactly the weights of the latest checkpoint (step 20).
    recipe = load_recipe(_recipe(tmp_path, {"sft": {
        "seq_len": 128, "micro_batch": 2, "epochs": 1, "datasets": [{"path": "qa.jsonl"}], "packing": False,
        "optimizer": {"lr": 0.0}, "schedule": {"kind": "constant", "warmup": 0}, "device": "cpu"}}))
    export_dir = run_sft(recipe)
    summary = json.loads((run_dir / "sft" / "summary.json").read_text())
    assert summary["init"] == str(run_dir) and summary["rows"] == 6 and summary["steps"] == 3
    exported = load_hf(export_dir).state_dict()
    for name, value in base.state_dict().items():
        assert torch.equal(exported[name], value), name


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from zagreus.cli import main

    path = _recipe(tmp_path, {})
    monkeypatch.setattr("sys.argv", ["zagreus", "sft", str(path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no sft: section" in err and "\n" not in err
    path = _recipe(tmp_path, {"dpo": {"init": "missing-folder", "datasets": [{"hub": "some/dataset"}]}})
    monkeypatch.setattr("sys.argv", ["zagreus", "dpo", str(path)])
    with pytest.raises(SystemExit):
        main()
    err = capsys.readouterr().err.strip()
    assert "missing-folder does not exist; fix the path" in err and "\n" not in err


def load_examples(spec, resolve_path, kind: str):
    """Every example of one dataset in a list, with its counts: the in-memory reading that the
    stages replaced with zagreus.post.shards, kept here as the reference the tests compare with."""
    from zagreus.post.datasets import LoadStats, dataset_name, dataset_rows, row_outcome

    stats, examples = LoadStats(dataset_name(spec)), []
    for where, row in dataset_rows(spec, resolve_path):
        if spec.max_examples is not None and stats.kept >= spec.max_examples:
            break
        example = stats.count(row_outcome(row, where, spec.format, kind))
        if example is not None:
            examples.append(example)
    stats.report()
    return examples, stats
