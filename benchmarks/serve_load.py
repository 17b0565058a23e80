"""Load check of `zagreus serve`: 32 concurrent streaming chat requests against a live server,
no error allowed, with p50/p95 latency, time to first token and throughput; beside it the same
requests sent one at a time, the same load against `zagreus serve --batch` (batched decode), our
generate in-process (the model's speed without HTTP), and the
peer: transformers' `generate` on the same export, one request at a time (it has no server), with
the throughput ratios.

The model: preset 'tiny' (d=128, 4 layers, context 512), random init, over an 8,192-token BPE
trained on the handbook (../shared/data). Prompts: the opening of 32 different handbook pages,
rendered with the export's ChatML template. Greedy, max_tokens 64 each. The server runs in its
own process (`zagreus serve`); the client is the official `openai` AsyncOpenAI.

    python benchmarks/serve_load.py [--requests 32] [--max-tokens 64] [--threads 1] [--model EXPORT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench.serve_load")
HANDBOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "handbook-5lang.jsonl"


def make_export(out: Path, handbook: Path) -> Path:
    from zagreus.model.config import resolve_model_config
    from zagreus.model.hf import save_hf
    from zagreus.model.llama import Transformer
    from zagreus.post.chat import jinja_template
    from zagreus.tokenizer import train_bpe

    texts = [json.loads(line)["text"] for line in handbook.open(encoding="utf-8")]
    tok = train_bpe(texts[:200], 8192, out / "tokenizer")
    cfg = resolve_model_config("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = Transformer(cfg)
    model.init_weights(0)
    return save_hf(model, tok, out / "export", chat_template=jinja_template("chatml"))


def prompts_from(handbook: Path, n: int) -> list[str]:
    docs = [json.loads(line) for line in handbook.open(encoding="utf-8")]
    step = max(1, len(docs) // n)
    # Skip the navigation lines at the top of each page; keep ~200 characters of prose.
    out = []
    for doc in docs[::step][:n]:
        prose = [ln for ln in doc["text"].splitlines() if len(ln) > 60]
        out.append((prose[0] if prose else doc["text"])[:200])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


async def one_request(client, name: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    text, usage = [], None
    stream = await client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens,
        stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": usage.completion_tokens,
            "text": "".join(text)}


async def run_load(base_url: str, name: str, prompts: list[str], max_tokens: int, concurrent: bool) -> tuple[list[dict], float]:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one_request(client, name, p, max_tokens) for p in prompts))
        else:
            results = [await one_request(client, name, p, max_tokens) for p in prompts]
        return list(results), time.perf_counter() - start


def summary(label: str, results: list[dict], wall: float) -> dict:
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    row = {"label": label, "requests": len(results), "tokens": tokens, "wall_s": wall,
           "p50_s": pct(lat, 50), "p95_s": pct(lat, 95), "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
           "tokens_per_s": tokens / wall, "requests_per_s": len(results) / wall}
    print(f"{label:<36} {len(results):>3} req {tokens:>5} tok {wall:7.2f} s | latency p50 {row['p50_s']:6.2f} s "
          f"p95 {row['p95_s']:6.2f} s | first token p50 {row['ttft_p50_s']:6.2f} s p95 {row['ttft_p95_s']:6.2f} s | "
          f"{row['tokens_per_s']:7.1f} tok/s {row['requests_per_s']:5.2f} req/s")
    return row


def zagreus_side(export: Path, prompts: list[str], max_tokens: int) -> tuple[list[dict], float]:
    """Our generate_stream in-process, one request at a time: the model's speed without HTTP."""
    from zagreus.model.generate import SamplingParams, generate
    from zagreus.checkpoint import load_model_and_tokenizer
    from zagreus.post.chat import render, stop_token_ids

    model, tok = load_model_and_tokenizer(export)
    model.eval()
    params = SamplingParams(max_new_tokens=max_tokens, stop_ids=stop_token_ids(tok, "chatml"))
    results = []
    start = time.perf_counter()
    for p in prompts:
        t0 = time.perf_counter()
        ids = render([{"role": "user", "content": p}], tok, add_generation_prompt=True).ids
        new = generate(model, ids, params)
        t1 = time.perf_counter()
        results.append({"latency": t1 - t0, "ttft": t1 - t0, "tokens": len(new), "text": tok.decode(new)})
    return results, time.perf_counter() - start


def transformers_side(export: Path, prompts: list[str], max_tokens: int) -> tuple[list[dict], float]:
    """The peer: transformers' greedy generate with its KV cache, one request at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zagreus.post.chat import stop_token_ids
    from zagreus.tokenizer import load_tokenizer

    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    stops = stop_token_ids(load_tokenizer(str(export)), "chatml")
    results = []
    start = time.perf_counter()
    for p in prompts:
        t0 = time.perf_counter()
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=stops, pad_token_id=stops[-1])
        new = out[0, ids.shape[1]:].tolist()
        if new and new[-1] in stops:
            new = new[:-1]
        t1 = time.perf_counter()
        results.append({"latency": t1 - t0, "ttft": t1 - t0, "tokens": len(new),
                        "text": tok.decode(new, skip_special_tokens=False)})
    return results, time.perf_counter() - start


@contextlib.contextmanager
def running_server(export: Path, extra: list[str]):
    """A `zagreus serve` process on a free port; yields its base URL once /health answers."""
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "zagreus.cli", "serve", str(export), "--port", str(port),
                               "--name", "tiny", *extra], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.time() > deadline:
                sys.exit("the server did not start")
            time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


def load_check(base: str, label: str, prompts: list[str], max_tokens: int) -> tuple[list[dict], dict]:
    asyncio.run(run_load(base, "tiny", prompts[:2], max_tokens, concurrent=False))  # warm-up
    try:
        results, wall = asyncio.run(run_load(base, "tiny", prompts, max_tokens, concurrent=True))
    except Exception as exc:
        sys.exit(f"load check FAILED ({label}): {type(exc).__name__}: {exc}")
    return results, summary(label, results, wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="an export folder (default: a random 'tiny' model made here)")
    ap.add_argument("--handbook", type=Path, default=HANDBOOK)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the peer")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.handbook.is_file():
        sys.exit(f"{args.handbook}: not found; pass --handbook (the prompts come from it)")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        export = args.model or make_export(Path(tmp), args.handbook)
        prompts = prompts_from(args.handbook, args.requests)
        n = args.requests
        print(f"model {export}, {n} requests, max_tokens {args.max_tokens}, greedy, {args.threads} torch threads")
        with running_server(export, []) as base:
            load, ours = load_check(base, f"zagreus serve, {n} concurrent", prompts, args.max_tokens)
            solo, wall_solo = asyncio.run(run_load(base, "tiny", prompts, args.max_tokens, concurrent=False))
            summary("zagreus serve, one at a time", solo, wall_solo)
        with running_server(export, ["--batch"]) as base:
            batched, ours_batched = load_check(base, f"zagreus serve --batch, {n} concurrent", prompts, args.max_tokens)
        same = sum(a["text"] == b["text"] for a, b in zip(load, solo))
        same_batched = sum(a["text"] == b["text"] for a, b in zip(batched, solo))
        print(f"replies identical to one-at-a-time replies: concurrent {same}/{n}, concurrent --batch {same_batched}/{n}")
        import torch

        torch.set_num_threads(args.threads)
        local, wall_local = zagreus_side(export, prompts, args.max_tokens)
        inproc = summary("zagreus generate in-process, serial", local, wall_local)
        peer, wall_peer = transformers_side(export, prompts, args.max_tokens)
        theirs = summary("transformers generate, serial", peer, wall_peer)
        agree = sum(a["text"] == b["text"] for a, b in zip(local, peer))
        print(f"greedy replies identical to transformers': {agree}/{n}")
        print(f"throughput ratios: zagreus / transformers generate, in-process {inproc['tokens_per_s'] / theirs['tokens_per_s']:.2f}x; "
              f"zagreus serve concurrent / transformers in-process {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x; "
              f"zagreus serve --batch concurrent / transformers in-process "
              f"{ours_batched['tokens_per_s'] / theirs['tokens_per_s']:.2f}x")
        if same != n:
            sys.exit("concurrent replies differ from one-at-a-time replies")


if __name__ == "__main__":
    main()
