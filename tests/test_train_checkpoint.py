"""Checkpoints: DCP round trip of model and optimizer, keep-K, atomic saves, model loading."""

import json
import subprocess
import sys
import textwrap

import torch

from zagreus.model.config import resolve_model_config
from zagreus.recipe import OptimizerSection
from zagreus.checkpoint import load_checkpoint, load_checkpoint_model, save_checkpoint
from zagreus.rundir import list_checkpoints
from zagreus.model.llama import build_model
from zagreus.train.optim import build_optimizer

CFG = resolve_model_config("tiny", n_layers=2, vocab_size=512, hidden_size=64, intermediate_size=128)


def _trained(seed: int):
    model = build_model(CFG, seed=seed)
    opt = build_optimizer(model, OptimizerSection(lr=1e-2))
    tokens = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    for _ in range(2):
        model(tokens).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_and_keep(tmp_path):
    model, opt = _trained(1)
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save_checkpoint(root, step, model, opt, {"model_config": CFG.model_dump(), "tokens": step * 7}, keep=2,
                        rank_state={"rng": torch.get_rng_state()})
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 30]
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]
    meta = json.loads((root / "step-000030" / "meta.json").read_text())
    assert meta["step"] == 30 and meta["tokens"] == 210 and meta["code_version"]["zagreus"]

    other, other_opt = _trained(2)
    meta, rank_state = load_checkpoint(root / "step-000030", other, other_opt)
    assert torch.equal(rank_state["rng"], torch.get_rng_state())
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert other.lm_head.weight is other.embed_tokens.weight
    ref, got = opt.state_dict(), other_opt.state_dict()
    for key in ref["state"]:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ref["state"][key][field], got["state"][key][field])
    assert got["param_groups"][1]["weight_decay"] == 0.0

    # An export-style load from the run directory takes the latest checkpoint and finds the tokenizer.
    from zagreus.tokenizer import train_bpe

    trained = train_bpe(["hello world, ciao mondo " * 50], 300, tmp_path / "tokenizer")
    loaded, tok = load_checkpoint_model(tmp_path)
    assert tok.fingerprint == trained.fingerprint
    tokens = torch.randint(0, CFG.vocab_size, (1, 12))
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


def test_crash_during_save_keeps_previous(tmp_path):
    """A process killed in the middle of dcp.save leaves the earlier checkpoint whole and listed."""
    model, opt = _trained(3)
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 5, model, opt, {"model_config": CFG.model_dump()}, keep=3)
    before = {p.name: p.read_bytes() for p in (root / "step-000005").iterdir()}
    script = textwrap.dedent(f"""
        import os, torch, torch.distributed.checkpoint as dcp
        from zagreus import checkpoint
        from zagreus.model.config import ModelConfig
        from zagreus.model.llama import build_model
        from zagreus.train.optim import build_optimizer
        from zagreus.recipe import OptimizerSection
        model = build_model(ModelConfig(**{CFG.model_dump()!r}), seed=9)
        real_save = dcp.save
        def dying_save(state, checkpoint_id, **kw):
            real_save(state, checkpoint_id=checkpoint_id, **kw)
            os._exit(9)  # killed after the tensors are written, before meta.json and the rename
        dcp.save = dying_save
        checkpoint.save_checkpoint({str(root)!r}, 6, model, build_optimizer(model, OptimizerSection()), {{}}, keep=1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert (root / ".tmp-step-000006").is_dir()  # the partial save is there, but not listed
    assert [s for s, _ in list_checkpoints(root)] == [5]
    assert {p.name: p.read_bytes() for p in (root / "step-000005").iterdir()} == before
    # The next save clears the partial folder.
    save_checkpoint(root, 6, model, opt, {"model_config": CFG.model_dump()}, keep=3)
    assert [s for s, _ in list_checkpoints(root)] == [5, 6]
    assert not (root / ".tmp-step-000006").exists()
