"""Chat and preference data tokenized once to memory-mapped shards (zagreus.post.shards): the same
items and counts as the in-memory path, the same bytes whatever the number of ranks and after a
SIGKILL and rerun, memory bounded by one work unit, a damaged unit named.

Ranks, kills and memory are measured in real child processes running `child` below.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
SEQ_LEN = 512  # a tool-calling chat renders to ~400 tokens here (the tools preamble)
CHILD = "import json, sys; sys.path.insert(0, sys.argv[1]); from test_post_shards import child; child(json.loads(sys.argv[2]))"
WORDS = ("roma", "mare", "sole", "cane", "gatto", "libro", "casa", "notte", "the", "sky", "is", "blue", "seven", "eight")


# --- what the children run ------------------------------------------------------------------
def encoder(tok, kind: str, seq_len: int, delay: float = 0.0):
    """One example as its sequences: rendered with chatml, shifted and cut by to_sequence; no
    sequence when nothing is left to train (the DPO pair trains the completions only)."""
    from zagreus.post.chat import render
    from zagreus.post.common import IGNORE, to_sequence

    def sft(ex):
        r = render(ex.messages, tok, "chatml", tools=ex.tools)
        seq, cut = to_sequence(r.ids, r.assistant_mask, seq_len)
        return ([] if all(x == IGNORE for x in seq.labels) else [(seq.ids, seq.labels)]), cut

    def dpo(ex):
        prompt_len = len(render(ex.prompt, tok, "chatml", tools=ex.tools).ids)
        seqs, cut = [], False
        for completion in (ex.chosen, ex.rejected):
            full = render(ex.prompt + completion, tok, "chatml", tools=ex.tools)
            seq, truncated = to_sequence(full.ids, [m and i >= prompt_len for i, m in enumerate(full.assistant_mask)], seq_len)
            seqs.append((seq.ids, seq.labels))
            cut |= truncated
        return ([] if any(all(x == IGNORE for x in labels) for _, labels in seqs) else seqs), cut

    def slow(ex):
        time.sleep(delay)
        return (sft if kind == "sft" else dpo)(ex)

    return slow if delay else (sft if kind == "sft" else dpo)


def _file_barrier(folder: Path, rank: int, world: int):
    calls = [0]

    def barrier() -> None:
        calls[0] += 1
        (folder / f"{calls[0]}.{rank}").touch()
        while not all((folder / f"{calls[0]}.{r}").exists() for r in range(world)):
            time.sleep(0.01)

    return barrier


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def child(cfg: dict) -> None:
    """prepare_shards as cfg says; prints one JSON line.

    Peaks: ru_maxrss as asked, and VmHWM, this program's own high-water mark. On Linux ru_maxrss
    keeps the parent's peak across fork and exec (pytest's few hundred MiB), so VmHWM is the one
    the memory test compares."""
    import resource

    import zagreus.post.common  # noqa: F401 - torch, which encoder imports, in the baseline
    from zagreus.post.shards import prepare_shards
    from zagreus.recipe import ChatDataset
    from zagreus.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg["tok"])
    before = _status_mb("VmRSS")
    t0 = time.time()
    folder = Path(cfg["folder"])
    barrier = _file_barrier(Path(cfg["barrier"]), cfg["rank"], cfg["world"]) if cfg.get("barrier") else (lambda: None)
    shards = prepare_shards(folder, {"test": 1}, [ChatDataset(**d) for d in cfg["datasets"]], Path, cfg["kind"],
                            encoder(tok, cfg["kind"], cfg.get("seq_len", SEQ_LEN), cfg.get("delay", 0.0)),
                            rank=cfg.get("rank", 0), world=cfg.get("world", 1), barrier=barrier,
                            unit_rows=cfg.get("unit_rows", 4096), workers=cfg.get("workers", 1))
    print(json.dumps({"items": len(shards), "seconds": round(time.time() - t0, 1), "rss_before_mb": round(before, 1),
                      "peak_mb": round(_status_mb("VmHWM"), 1), "rss_after_mb": round(_status_mb("VmRSS"), 1),
                      "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}), flush=True)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "TQDM_DISABLE": "1"}


def _start_child(cfg: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(TESTS), json.dumps(cfg)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_child(cfg: dict, timeout: float = 240) -> dict:
    p = _start_child(cfg)
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- data -----------------------------------------------------------------------------------
def _sentence(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


TOOLS = [{"type": "function", "function": {"name": "weather", "description": "the weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def _tool_chat(i: int, words: int = 3) -> dict:
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": f"weather {_sentence(i, words)}?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "weather", "arguments": json.dumps({"city": WORDS[i % len(WORDS)]})}}]},
        {"role": "tool", "content": json.dumps({"sky": WORDS[(i + 3) % len(WORDS)], "n": i % 97})},
        {"role": "assistant", "content": _sentence(i + 1, words)}]}


def _sft_rows(n: int) -> list:
    """Plain and tool-calling chats, with the rows the accounting counts: no assistant turn, a
    malformed message, one cut at seq_len, one whose answer lies past seq_len."""
    rows: list = []
    for i in range(n):
        if i % 3 == 0:
            rows.append(_tool_chat(i))
        else:
            rows.append({"messages": [{"role": "user", "content": _sentence(i, 4)},
                                      {"role": "assistant", "content": _sentence(i + 2, 1 + i % 6)}]})
    rows[4] = {"messages": [{"role": "user", "content": "only a question"}]}
    rows[6] = {"messages": [{"role": "wizard", "content": "abracadabra"}]}
    rows[8] = {"messages": [{"role": "user", "content": "long?"}, {"role": "assistant", "content": _sentence(8, 600)}]}
    rows[10] = {"messages": [{"role": "user", "content": _sentence(10, 600)}, {"role": "assistant", "content": "no."}]}
    return rows


def _write_jsonl(path: Path, rows: list, bad_line_at: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if bad_line_at is not None:
        lines.insert(bad_line_at, '{"messages": [not json')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from zagreus.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("bpe")
    texts = [_sentence(i, 12) for i in range(40)] + [json.dumps(_tool_chat(i)) for i in range(20)]
    train_bpe(texts, 400, folder)
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir):
    from zagreus.tokenizer import load_tokenizer

    return load_tokenizer(str(tok_dir))


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("sft-data")
    a = _write_jsonl(folder / "a.jsonl", _sft_rows(40), bad_line_at=13)
    b = _write_jsonl(folder / "b.jsonl", _sft_rows(30)[2:])
    return [{"path": str(a), "name": "a"}, {"path": str(b), "name": "b", "max_examples": 11}]


def _in_memory(specs: list[dict], kind: str, tok, seq_len: int = SEQ_LEN):
    """The in-memory path: every example of load_examples encoded in a list, and its counts."""
    from test_post_train import load_examples
    from zagreus.post.datasets import summarize
    from zagreus.recipe import ChatDataset

    encode, items, stats = encoder(tok, kind, seq_len), [], []
    truncated = dropped = 0
    for d in specs:
        examples, st = load_examples(ChatDataset(**d), Path, kind)
        stats.append(st)
        for ex in examples:
            seqs, cut = encode(ex)
            truncated += cut
            dropped += not seqs
            if seqs:
                items.append(seqs)
    what = "conversations" if kind == "sft" else "pairs"
    return items, {"data": summarize(stats),
                   "tokenized": {what: len(items), "truncated": truncated, "dropped_no_trained_token": dropped}}


def _prepare(folder: Path, specs: list[dict], kind: str, tok, unit_rows: int, **kw):
    from zagreus.post.shards import prepare_shards
    from zagreus.recipe import ChatDataset

    return prepare_shards(folder, {"test": 1}, [ChatDataset(**d) for d in specs], Path, kind,
                          encoder(tok, kind, SEQ_LEN), unit_rows=unit_rows, **kw)


def _assert_same_items(shards, items) -> None:
    assert len(shards) == len(items)
    assert shards.lengths.shape == (len(items), shards.per_item) and shards.lengths.dtype == np.int32
    for i, want in enumerate(items):
        got = shards.item(i)
        assert len(got) == len(want)
        for (ids, labels), (want_ids, want_labels) in zip(got, want):
            assert ids.dtype == np.int64 and labels.dtype == np.int64
            assert ids.tolist() == list(want_ids) and labels.tolist() == list(want_labels)


# --- the tests ------------------------------------------------------------------------------
def test_sft_shards_equal_in_memory_tokenization(tmp_path, sft_data, tok, caplog):
    from zagreus.post.shards import ChatShards

    caplog.set_level(logging.INFO)
    items, stats = _in_memory(sft_data, "sft", tok)
    assert stats["data"]["datasets"]["a"]["skipped_malformed"] == 2  # the bad JSON line and the wizard
    assert stats["data"]["datasets"]["a"]["skipped_no_assistant"] == 1
    assert stats["tokenized"]["truncated"] >= 2 and stats["tokenized"]["dropped_no_trained_token"] >= 1
    assert stats["data"]["datasets"]["b"]["kept"] == 11

    shards = _prepare(tmp_path / "s", sft_data, "sft", tok, unit_rows=7)
    assert shards.per_item == 1
    _assert_same_items(shards, items)
    assert shards.stats == stats
    assert "malformed row(s) skipped" in caplog.text
    # The cut of max_examples: the units of b past its 11th usable row are gone.
    assert sorted(p.name for p in (tmp_path / "s").glob("unit-001-*.json")) == ["unit-001-00000.json", "unit-001-00001.json"]
    assert ChatShards.open(tmp_path / "s").stats == stats

    # Same key: opened as it is, without reading the data.
    os.rename(sft_data[0]["path"], sft_data[0]["path"] + ".away")
    try:
        assert len(_prepare(tmp_path / "s", sft_data, "sft", tok, unit_rows=7)) == len(items)
    finally:
        os.rename(sft_data[0]["path"] + ".away", sft_data[0]["path"])
    # Another key: tokenized again (here with another unit size).
    caplog.clear()
    again = _prepare(tmp_path / "s", sft_data, "sft", tok, unit_rows=5)
    assert "the data changed" in caplog.text
    _assert_same_items(again, items)
    assert sorted(p.name for p in (tmp_path / "s").glob("unit-000-*.json"))[-1] == "unit-000-00008.json"


def test_no_usable_rows_names_the_dataset(tmp_path, tok):
    from zagreus.errors import UserError

    path = _write_jsonl(tmp_path / "empty.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UserError, match="dataset empty: no usable rows"):
        _prepare(tmp_path / "s", [{"path": str(path), "name": "empty"}], "sft", tok, unit_rows=4)


def test_two_ranks_write_the_bytes_of_one(tmp_path, sft_data, tok_dir):
    base = {"tok": str(tok_dir), "datasets": sft_data, "kind": "sft", "unit_rows": 4}
    one = _run_child({**base, "folder": str(tmp_path / "one")})
    (tmp_path / "barrier").mkdir()
    procs = [_start_child({**base, "folder": str(tmp_path / "two"), "rank": r, "world": 2, "barrier": str(tmp_path / "barrier")})
             for r in (1, 0)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert [o["items"] for o in outs] == [one["items"]] * 2
    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert sorted(a) == sorted(b) and any(n.startswith("unit-001-") for n in a)
    assert all(a[n] == b[n] for n in a), [n for n in a if a[n] != b[n]]


def test_forked_workers_write_the_bytes_of_one(tmp_path, sft_data, tok_dir):
    """Two ranks of three tokenizing workers each (6 tasks) against one process alone."""
    base = {"tok": str(tok_dir), "datasets": sft_data, "kind": "sft", "unit_rows": 4}
    one = _run_child({**base, "folder": str(tmp_path / "one")})
    (tmp_path / "barrier").mkdir()
    procs = [_start_child({**base, "folder": str(tmp_path / "six"), "rank": r, "world": 2, "workers": 3,
                           "barrier": str(tmp_path / "barrier")}) for r in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["items"] == one["items"]
    a, b = _files(tmp_path / "one"), _files(tmp_path / "six")
    assert sorted(a) == sorted(b) and all(a[n] == b[n] for n in a), [n for n in a if a.get(n) != b.get(n)]


def test_a_bad_file_in_a_worker_is_one_line(tmp_path, tok):
    from zagreus.errors import UserError

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:1:.*not valid UTF-8"):
        _prepare(tmp_path / "s", [{"path": str(bad)}], "sft", tok, unit_rows=4, workers=2)


def test_sigkill_then_rerun_gives_the_same_bytes(tmp_path, tok_dir):
    rows = [_tool_chat(i) if i % 4 == 0 else {"messages": [{"role": "user", "content": _sentence(i, 3)},
                                                           {"role": "assistant", "content": _sentence(i, 2)}]}
            for i in range(3000)]
    data = [{"path": str(_write_jsonl(tmp_path / "big.jsonl", rows, bad_line_at=1234)), "name": "big"}]
    cfg = {"tok": str(tok_dir), "datasets": data, "kind": "sft", "unit_rows": 100}
    whole = _run_child({**cfg, "folder": str(tmp_path / "whole")})

    killed = tmp_path / "killed"
    p = _start_child({**cfg, "folder": str(killed), "delay": 0.002})
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("unit-*.json"))) < 5:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    done = len(list(killed.glob("unit-*.json")))
    assert 5 <= done < 31 and not (killed / "manifest.json").exists(), done
    finished = {p.name: p.stat().st_mtime_ns for m in killed.glob("unit-*.json") for p in killed.glob(m.stem + ".*")}
    again = _run_child({**cfg, "folder": str(killed)})
    assert all((killed / n).stat().st_mtime_ns == t for n, t in finished.items()), "a finished unit was redone"
    assert again["items"] == whole["items"]
    a, b = _files(tmp_path / "whole"), _files(killed)
    assert sorted(a) == sorted(b) and all(a[n] == b[n] for n in a)
    print(f"\nresume: killed after {done} of 31 units; {whole['items']} conversations, "
          f"{whole['seconds']} s uninterrupted, {again['seconds']} s for the rerun")


def test_dpo_pairs(tmp_path, tok):
    rows = [{"prompt": _sentence(i, 3), "chosen": _sentence(i + 1, 1 + i % 5), "rejected": _sentence(i + 2, 2)}
            for i in range(25)]
    rows[3] = {"prompt": "p", "chosen": "same", "rejected": "same"}  # malformed: identical
    rows[5] = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "no answer"}],
               "rejected": "r"}  # no assistant turn in chosen
    rows[7] = {"prompt": _sentence(7, 600), "chosen": "a", "rejected": "b"}  # nothing trained within seq_len
    rows[9] = {"prompt": "q", "chosen": _sentence(9, 600), "rejected": "b"}  # cut
    rows[11] = {"prompt": "weather?", "tools": TOOLS,
                "chosen": [{"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": "roma"}}]}],
                "rejected": "I cannot."}
    specs = [{"path": str(_write_jsonl(tmp_path / "pref.jsonl", rows)), "name": "pref"}]
    items, stats = _in_memory(specs, "dpo", tok)
    assert stats["tokenized"]["truncated"] >= 2 and stats["tokenized"]["dropped_no_trained_token"] >= 1
    shards = _prepare(tmp_path / "s", specs, "dpo", tok, unit_rows=6)
    assert shards.per_item == 2 and shards.lengths.shape == (len(items), 2)
    _assert_same_items(shards, items)
    assert shards.stats == stats and "pairs" in shards.stats["tokenized"]


def _short_tool_chat(i: int) -> dict:
    """A short multi-turn chat with a tool call and its result: rendering, not length, is the cost."""
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": WORDS[i % len(WORDS)]},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": WORDS[i % 7]}}]},
        {"role": "tool", "content": str(i % 97)},
        {"role": "assistant", "content": WORDS[(i + 3) % len(WORDS)]}]}


def _peak_mib(pid: int) -> float | None:
    """VmHWM, the high-water mark of a running process's resident memory, in MiB (None once it is gone).
    ru_maxrss would not do: on Linux it keeps the parent's peak across fork and exec."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((x for x in text.splitlines() if x.startswith("VmHWM:")), None)
    return int(line.split()[1]) / 1024 if line else None


def _sft_until_step(recipe: Path, stage_dir: Path, steps: int) -> tuple[float, int]:
    """`zagreus sft RECIPE` until `steps` steps are logged, then SIGTERM (it saves and exits 143);
    returns (peak MiB over its whole life, exit status)."""
    proc = subprocess.Popen([sys.executable, "-m", "zagreus.cli", "sft", str(recipe)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, signalled, deadline = 0.0, False, time.time() + 600
    metrics = stage_dir / "metrics.jsonl"
    while proc.poll() is None and time.time() < deadline:
        peak = max(peak, _peak_mib(proc.pid) or 0.0)
        if not signalled and metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            proc.send_signal(signal.SIGTERM)
            signalled = True
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert signalled, err[-3000:]
    return peak, proc.returncode


@pytest.mark.slow
def test_memory_flat_from_20k_to_200k_chats_and_training_under_1gb(tmp_path, tok_dir):
    """`zagreus sft` on 20k and then 200k multi-turn tool-calling chats, each run tokenizing its set to
    shards and training 3 steps of the tiny preset: the peak of the 200k process is within 20% of the
    20k one's and under 1 GiB."""
    import yaml

    from zagreus.model.hf import save_hf
    from zagreus.model.llama import build_model
    from zagreus.recipe import load_recipe
    from zagreus.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tok_dir))
    init = save_hf(build_model(load_recipe_model(tok), seed=0), tok, tmp_path / "init")
    measured = {}
    for n in (20_000, 200_000):
        path = tmp_path / f"chats-{n}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps(_short_tool_chat(i)) + "\n")
        recipe = tmp_path / f"sft-{n}.yaml"
        recipe.write_text(yaml.safe_dump({"name": f"mem{n}", "run_dir": str(tmp_path / f"run-{n}"),
                                          "model": {"preset": "tiny"}, "sft": {
            "init": str(init), "datasets": [{"path": str(path)}], "seq_len": SEQ_LEN, "micro_batch": 4,
            "log_every": 1, "device": "cpu", "checkpoint": {"every": 1000, "keep": 1}}}))
        stage_dir = tmp_path / f"run-{n}" / "sft"
        t0 = time.time()
        peak, status = _sft_until_step(recipe, stage_dir, steps=3)
        manifest = json.loads((stage_dir / "data" / "manifest.json").read_text())
        measured[n] = {"peak_mib": round(peak, 1), "seconds": round(time.time() - t0, 1), "items": manifest["items"],
                       "tokens": manifest["tokens"]}
        assert status == 143 and manifest["items"] == n
        assert load_recipe(recipe).sft is not None and (stage_dir / "checkpoints").is_dir()
        path.unlink()
    print(f"\nzagreus sft, tokenize + 3 steps of the tiny preset: 20k {measured[20_000]}, 200k {measured[200_000]}")
    assert measured[200_000]["peak_mib"] <= 1.2 * measured[20_000]["peak_mib"]
    assert measured[200_000]["peak_mib"] < 1024


def load_recipe_model(tok):
    """The tiny preset with the test tokenizer's vocabulary, as `model: {preset: tiny}` resolves it."""
    from zagreus.model.config import resolve_model_config

    return resolve_model_config("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)


def test_damaged_unit_is_named(tmp_path, sft_data, tok):
    from zagreus.errors import UserError
    from zagreus.post.shards import ChatShards

    _prepare(tmp_path / "s", sft_data, "sft", tok, unit_rows=7)
    victim = tmp_path / "s" / "unit-000-00002.ids.npy"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"unit-000-00002\.ids\.npy: damaged or missing .*delete .* or rerun with --force"):
        ChatShards.open(tmp_path / "s")
    with pytest.raises(UserError, match=r"unit-000-00002\.ids\.npy"):
        _prepare(tmp_path / "s", sft_data, "sft", tok, unit_rows=7)
    victim.unlink()
    with pytest.raises(UserError, match=r"unit-000-00002\.ids\.npy: damaged or missing"):
        ChatShards.open(tmp_path / "s")
