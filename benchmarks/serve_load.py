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

`--soak` runs the soak instead: `--clients` (64) clients for `--seconds` (60), each looping over a
seeded mix of normal greedy chat requests (streaming or not), oversized bodies (2 MiB: 413),
malformed ones (bad JSON, out-of-range fields: 400) and abandoned ones (a raw socket closed while
its request waits, generates, or is still uploading). It prints the count of 5xx (must be 0),
/health latency measured from a separate process every 50 ms (p99 target under 100 ms), the
server's RSS at start, middle and end, whether every normal reply equals the reply the idle
server gave to the same prompt before the soak, and how long the server takes to be idle after.

    python benchmarks/serve_load.py --soak [--clients 64] [--seconds 60] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import http.client
import json
import logging
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("bench.serve_load")
HANDBOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "handbook-5lang.jsonl"


def make_export(out: Path, handbook: Path, preset: str = "tiny") -> Path:
    from zagreus.model.config import resolve_model_config
    from zagreus.model.hf import save_hf
    from zagreus.model.llama import Transformer
    from zagreus.post.chat import jinja_template
    from zagreus.tokenizer import train_bpe

    texts = [json.loads(line)["text"] for line in handbook.open(encoding="utf-8")]
    tok = train_bpe(texts[:200], 8192, out / "tokenizer")
    cfg = resolve_model_config(preset, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
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
def running_server(export: Path, extra: list[str], log: Path | None = None):
    """A `zagreus serve` process on a free port (its output into `log`, if given); yields its base
    URL and process once /health answers."""
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out = log.open("w") if log else subprocess.DEVNULL
    server = subprocess.Popen([sys.executable, "-m", "zagreus.cli", "serve", str(export), "--port", str(port),
                               "--name", "tiny", *extra], stderr=out, stdout=out)
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
        yield base, server
    finally:
        server.terminate()
        server.wait(timeout=30)
        if log:
            out.close()


def load_check(base: str, label: str, prompts: list[str], max_tokens: int) -> tuple[list[dict], dict]:
    asyncio.run(run_load(base, "tiny", prompts[:2], max_tokens, concurrent=False))  # warm-up
    try:
        results, wall = asyncio.run(run_load(base, "tiny", prompts, max_tokens, concurrent=True))
    except Exception as exc:
        sys.exit(f"load check FAILED ({label}): {type(exc).__name__}: {exc}")
    return results, summary(label, results, wall)


# --- the soak --------------------------------------------------------------------------------
MALFORMED = [
    b"{not json",
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}',
    b'{"messages": [{"role": "wizard", "content": "hi"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"messages": [{"role": "user", "content": "hi"}], "tools": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b'{"model": "tiny"}',
]
OVERSIZED = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
MIX = {"normal": 50, "oversized": 10, "malformed": 15, "abandoned": 25}  # weights of what a client sends next
EXPECTED = {"normal": {200}, "oversized": {413}, "malformed": {400}}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def probe_health(base: str, seconds: float, results) -> None:
    """GET /health every 50 ms for `seconds` over one kept-alive connection, in its own process so
    the load generator's own work does not count; sends back the latencies (None: a failed probe)."""
    where = urlsplit(base)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    latencies: list[float | None] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            latencies.append(time.perf_counter() - start if response.status == 200 else None)
        except OSError:
            latencies.append(None)
            conn.close()
        time.sleep(0.05)
    results.send(latencies)


def chat_body(prompt: str, max_tokens: int, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, **extra}


async def normal_request(client, prompt: str, max_tokens: int, stream: bool) -> tuple[int, str | None]:
    """A greedy chat request; its status and reply text."""
    if not stream:
        r = await client.post("/v1/chat/completions", json=chat_body(prompt, max_tokens))
        return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(prompt, max_tokens, stream=True)) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None
        pieces = []
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return 500, None  # an error after the stream began: a server failure all the same
                pieces += [c["delta"].get("content") or "" for c in chunk["choices"]]
        return 200, "".join(pieces)


async def chunked(body: bytes, size: int = 65536):
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def abandon(base: str, rng: random.Random, prompt: str) -> None:
    """A request on a raw socket, closed after 50-500 ms: waiting, generating, or (one in four) mid-upload."""
    where = urlsplit(base)
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    body = json.dumps(chat_body(prompt, 256, stream=rng.random() < 0.5)).encode()
    declared = len(body) + (100_000 if rng.random() < 0.25 else 0)  # more than will ever come
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {declared}\r\n\r\n".encode() + body)
    await writer.drain()
    await asyncio.sleep(rng.uniform(0.05, 0.5))
    writer.close()


async def soak_client(i: int, client, base: str, prompts: list[str], references: list[str], max_tokens: int,
                      end: float, record) -> None:
    rng = random.Random(i)
    while time.monotonic() < end:
        kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        j = rng.randrange(len(prompts))
        try:
            if kind == "normal":
                stream = rng.random() < 0.5
                status, text = await normal_request(client, prompts[j], max_tokens, stream)
                record(kind, status, correct=text == references[j] if status == 200 else None)
            elif kind == "oversized":
                # Every other one without a Content-Length: chunked, refused as it passes the limit.
                content = OVERSIZED if rng.random() < 0.5 else chunked(OVERSIZED)
                record(kind, (await client.post("/v1/chat/completions", content=content)).status_code)
            elif kind == "malformed":
                record(kind, (await client.post("/v1/chat/completions", content=rng.choice(MALFORMED))).status_code)
            else:
                await abandon(base, rng, prompts[j])
                record(kind, None)
        except Exception as exc:  # a transport error is a failure to count, not a reason to stop the soak
            record(kind, f"{type(exc).__name__}")


async def run_soak(base: str, pid: int, prompts: list[str], references: list[str], clients: int, seconds: float,
                   max_tokens: int) -> tuple[collections.Counter, list[bool], dict[str, float]]:
    import httpx

    counts: collections.Counter = collections.Counter()
    replies: list[bool] = []  # for each normal reply, whether it equals the idle server's

    def record(kind: str, status, correct: bool | None = None) -> None:
        counts[(kind, status)] += 1
        if correct is not None:
            replies.append(correct)

    rss = {"start": rss_mb(pid)}
    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:

        async def middle() -> None:
            await asyncio.sleep(seconds / 2)
            rss["middle"] = rss_mb(pid)

        await asyncio.gather(middle(), *(soak_client(i, client, base, prompts, references, max_tokens, end, record)
                                         for i in range(clients)))
    rss["end"] = rss_mb(pid)
    return counts, replies, rss


def soak(export: Path, handbook: Path, clients: int, seconds: float, max_tokens: int, log: Path) -> bool:
    """The soak against one `zagreus serve` (default flags); prints its numbers, True if it met its targets."""
    import httpx

    prompts = prompts_from(handbook, 16)
    with running_server(export, [], log) as (base, server):
        with httpx.Client(base_url=base, timeout=120) as client:  # the idle server's replies, one at a time
            references = [client.post("/v1/chat/completions", json=chat_body(p, max_tokens)).json()
                          ["choices"][0]["message"]["content"] for p in prompts]
        ctx = multiprocessing.get_context("spawn")
        received, sent = ctx.Pipe(duplex=False)
        prober = ctx.Process(target=probe_health, args=(base, seconds, sent))
        prober.start()
        gc.freeze()  # this process's collections would only slow the load it generates
        counts, correct, rss = asyncio.run(run_soak(base, server.pid, prompts, references, clients, seconds,
                                                    max_tokens))
        probes = received.recv()
        prober.join()
        start = time.perf_counter()
        while (health := httpx.get(base + "/health").json())["running"] or health["waiting"]:
            if time.perf_counter() - start > 60:
                break
            time.sleep(0.05)
        idle_after = time.perf_counter() - start
    by_kind = collections.Counter()
    for (kind, _), n in counts.items():
        by_kind[kind] += n
    server_errors = sum(n for (_, status), n in counts.items() if isinstance(status, int) and status >= 500)
    unexpected = {f"{kind} {status}": n for (kind, status), n in counts.items()
                  if kind in EXPECTED and status not in EXPECTED[kind]}
    ok_probes = sorted(x for x in probes if x is not None)
    p99 = pct(ok_probes, 99) * 1000
    log_errors = [line for line in log.read_text().splitlines() if "Traceback" in line or " ERROR " in line]
    print(f"soak: {clients} clients for {seconds:.0f} s against `zagreus serve` (default flags), "
          f"greedy max_tokens {max_tokens}")
    print("requests sent: " + ", ".join(f"{kind} {by_kind[kind]}" for kind in MIX))
    print("statuses: " + ", ".join(f"{kind} {status}: {n}" for (kind, status), n in sorted(counts.items(), key=str)))
    print(f"5xx: {server_errors}; unexpected statuses or transport errors: {sum(unexpected.values())} {unexpected or ''}")
    print(f"normal replies equal to the idle server's reply to the same prompt: {sum(correct)}/{len(correct)}")
    print(f"/health during the soak: {len(ok_probes)} probes ({len(probes) - len(ok_probes)} failed), "
          f"p50 {pct(ok_probes, 50) * 1000:.1f} ms, p99 {p99:.1f} ms, max {ok_probes[-1] * 1000:.1f} ms")
    print(f"server RSS: start {rss['start']:.0f} MB, middle {rss['middle']:.0f} MB, end {rss['end']:.0f} MB")
    print(f"idle (running 0, waiting 0) {idle_after:.2f} s after the soak; tokens generated {health['tokens_generated']}")
    print(f"server log: {len(log_errors)} error or traceback lines")
    return (server_errors == 0 and not unexpected and all(correct) and len(probes) == len(ok_probes)
            and p99 < 100 and not log_errors and idle_after < 60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="an export folder (default: a random 'tiny' model made here)")
    ap.add_argument("--handbook", type=Path, default=HANDBOOK)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the peer")
    ap.add_argument("--soak", action="store_true", help="run the soak instead of the load check")
    ap.add_argument("--clients", type=int, default=64, help="soak: concurrent clients")
    ap.add_argument("--seconds", type=float, default=60, help="soak: how long")
    ap.add_argument("--preset", default="tiny", help="the random model's shape (ignored with --model)")
    ap.add_argument("--batch-only", action="store_true",
                    help="only the concurrent load on `zagreus serve --batch` (the GPU check's part)")
    ap.add_argument("--json-out", type=Path, help="with --batch-only: write its figures here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    if not args.handbook.is_file():
        sys.exit(f"{args.handbook}: not found; pass --handbook (the prompts come from it)")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        export = args.model or make_export(Path(tmp), args.handbook, args.preset)
        if args.soak:
            if not soak(export, args.handbook, args.clients, args.seconds, args.max_tokens, Path(tmp) / "serve.log"):
                sys.exit("soak FAILED its targets (above)")
            return
        prompts = prompts_from(args.handbook, args.requests)
        n = args.requests
        print(f"model {export}, {n} requests, max_tokens {args.max_tokens}, greedy, {args.threads} torch threads")
        if args.batch_only:
            with running_server(export, ["--batch"]) as (base, _):
                _, row = load_check(base, f"zagreus serve --batch, {n} concurrent", prompts, args.max_tokens)
            if args.json_out:
                args.json_out.write_text(json.dumps(row))
            return
        with running_server(export, []) as (base, _):
            load, ours = load_check(base, f"zagreus serve, {n} concurrent", prompts, args.max_tokens)
            solo, wall_solo = asyncio.run(run_load(base, "tiny", prompts, args.max_tokens, concurrent=False))
            summary("zagreus serve, one at a time", solo, wall_solo)
        with running_server(export, ["--batch"]) as (base, _):
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
