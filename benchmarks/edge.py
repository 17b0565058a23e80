"""Edge inference on CPU: llama.cpp on our GGUF files (q8_0, q4_0) against zagreus' own decoder
(zagreus.model.generate, fp32) and transformers' generate (fp32), on the zagreus-0.4b shape (--preset).

Random weights (seed 0: speed and memory do not depend on training) with the Llama-3 tokenizer,
exported once as a Hugging Face folder and as GGUF files by `zagreus.release.gguf`. The same
prompts (the starts of handbook pages, --prompt-tokens each) are decoded greedily for
--new-tokens tokens, with no stop token, on --threads threads. Each engine runs in its own
subprocess, so its peak RSS (VmHWM: resident memory, mmapped weights included) is its own; a
`baseline` child imports the same libraries and loads nothing. Decode tokens/s is the tokens after
the first over the time from the first to the last (prefill excluded); prefill tokens/s is the
prompt over the time to the first token. llama.cpp runs through zagreus' LlamaCppModel (what
`zagreus chat --gguf` runs), whose per-token overhead is one copy of the logits.

    python benchmarks/edge.py                                 # needs llama-cpp-python (make edge-check)
    python benchmarks/edge.py --work /tmp/edge --new-tokens 64 --json-out edge.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HANDBOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "handbook-5lang.jsonl"
QUANTS = ("q8_0", "q4_0")
ENGINES = ("baseline", "zagreus-fp32", "transformers-fp32", *(f"llama.cpp-{q}" for q in QUANTS))


def prompts(n: int, length: int) -> list[list[int]]:
    """`n` prompts of `length` Llama-3 tokens (BOS first) from the middle of different handbook pages."""
    from zagreus.tokenizer import load_tokenizer

    tok = load_tokenizer("llama3")
    with HANDBOOK.open(encoding="utf-8") as f:
        pages = [json.loads(line)["text"] for line in f]
    # The pages open with the same navigation lines, so the prompts start 200 tokens in.
    encoded = [ids for ids in tok.encode_batch(pages[:: len(pages) // (4 * n)]) if len(ids) > 200 + length]
    return [[tok.bos_id] + ids[200:200 + length - 1] for ids in encoded[:n]]


def prepare(work: Path, preset: str) -> dict[str, Path]:
    """The export folder and the GGUF files of a random model of `preset`, written once into `work`."""
    from zagreus.model.config import resolve_model_config
    from zagreus.model.hf import save_hf
    from zagreus.model.llama import build_model
    from zagreus.release.gguf import write_gguf
    from zagreus.tokenizer import load_tokenizer

    files = {"export": work / preset, **{q: work / f"{preset}-{q}.gguf" for q in QUANTS}}
    if all(p.exists() for p in files.values()):
        return files
    tok = load_tokenizer("llama3")
    model = build_model(resolve_model_config(preset, vocab_size=tok.vocab_size), seed=0).eval()
    save_hf(model, tok, files["export"])
    for q in QUANTS:
        start = time.perf_counter()
        write_gguf(model, tok, files[q], q, name=preset)
        print(f"wrote {files[q].name} in {time.perf_counter() - start:.0f} s", flush=True)
    return files


def run_engine(engine: str, files: dict[str, Path], batch: list[list[int]], new_tokens: int, threads: int) -> dict:
    """Child mode: load `engine`, decode every prompt, report the tokens, timings and peak RSS."""
    import torch

    from zagreus.model.generate import SamplingParams, generate_stream

    torch.set_num_threads(threads)
    params = SamplingParams(max_new_tokens=new_tokens)
    decode = None  # prompt -> (new tokens, the time each arrived)
    if engine == "baseline":
        import llama_cpp  # noqa: F401  (what the other children import)
        import transformers  # noqa: F401
    elif engine == "transformers-fp32":
        from transformers import AutoModelForCausalLM
        from transformers.generation.streamers import BaseStreamer

        model = AutoModelForCausalLM.from_pretrained(files["export"], dtype=torch.float32).eval()

        class Clock(BaseStreamer):
            """generate() puts the prompt first, then each new token as it is picked."""

            def __init__(self):
                self.seen = []

            def put(self, value):
                self.seen.append((int(value.reshape(-1)[-1]), time.perf_counter()))

            def end(self):
                pass

        def decode(prompt):
            clock = Clock()
            model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, streamer=clock)
            return [t for t, _ in clock.seen[1:]], [at for _, at in clock.seen[1:]]
    else:
        if engine == "zagreus-fp32":
            from zagreus.model.hf import load_hf

            model = load_hf(files["export"]).eval()
        else:
            from zagreus.serve.llama_cpp import LlamaCppModel, open_llama

            model = LlamaCppModel(open_llama(files[engine.removeprefix("llama.cpp-")], n_ctx=512, n_threads=threads))

        def decode(prompt):
            tokens, times = [], []
            for token in generate_stream(model, prompt, params):
                tokens.append(token)
                times.append(time.perf_counter())
            return tokens, times

    rows = []
    for prompt in batch if decode is not None else []:
        start = time.perf_counter()
        tokens, times = decode(prompt)
        rows.append({"tokens": tokens, "prefill_s": times[0] - start, "decode_s": times[-1] - times[0]})
    return {"engine": engine, "rows": rows, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a
    child would report at least the size of the parent that forked it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="zagreus-0.4b", help="model shape (random weights)")
    ap.add_argument("--work", type=Path, help="folder for the model files (default: a temporary one, removed after)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--files", help=argparse.SUPPRESS)
    ap.add_argument("--batch", help=argparse.SUPPRESS)  # the prompts' ids, so that no child loads the tokenizer
    args = ap.parse_args()
    if args.engine:
        files = {k: Path(v) for k, v in json.loads(args.files).items()}
        print(json.dumps(run_engine(args.engine, files, json.loads(args.batch), args.new_tokens, args.threads)))
        return

    batch = prompts(args.prompts, args.prompt_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = prepare(work, args.preset)
        # Sleeping OpenMP threads, as `zagreus pretrain` sets: spinning ones collapse on a shared CPU.
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        results = {}
        for engine in ENGINES:
            out = subprocess.run([sys.executable, __file__, "--engine", engine, "--files",
                                  json.dumps({k: str(v) for k, v in files.items()}), "--batch", json.dumps(batch),
                                  "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                                  "--threads", str(args.threads)], env=env, capture_output=True, text=True, check=True)
            results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"ran {engine}", flush=True)
        sizes = {"export": sum(f.stat().st_size for f in files["export"].glob("*.safetensors")),
                 **{q: files[q].stat().st_size for q in QUANTS}}

    reference = [r["tokens"] for r in results["zagreus-fp32"]["rows"]]
    weights = {"zagreus-fp32": sizes["export"], "transformers-fp32": sizes["export"],
               **{f"llama.cpp-{q}": sizes[q] for q in QUANTS}}
    from zagreus.model.config import resolve_model_config

    total = resolve_model_config(args.preset, vocab_size=128256).param_counts()["total"]
    print(f"\n{args.preset} shape ({total:,} parameters, random weights), {args.prompts} prompts x "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens greedy, {args.threads} threads")
    print(f"  {'engine':18} {'weights file':>13} {'decode tok/s':>13} {'prefill tok/s':>14} {'peak RSS MB':>12} "
          f"{'same tokens as zagreus':>23}")
    summary = {}
    for engine, result in results.items():
        rows = result["rows"]
        line = {"peak_rss_mb": result["peak_rss_mb"]}
        if rows:
            line["decode_tok_s"] = statistics.median((len(r["tokens"]) - 1) / r["decode_s"] for r in rows)
            line["prefill_tok_s"] = statistics.median(args.prompt_tokens / r["prefill_s"] for r in rows)
            line["same_as_zagreus"] = sum(r["tokens"] == ref for r, ref in zip(rows, reference))
            line["weights_bytes"] = weights[engine]
            print(f"  {engine:18} {weights[engine] / 1e6:11,.0f}MB {line['decode_tok_s']:13.1f} "
                  f"{line['prefill_tok_s']:14.1f} {line['peak_rss_mb']:12,.0f} {line['same_as_zagreus']:>18}/{len(rows)}")
        else:
            print(f"  {engine:18} {'':>13} {'':>13} {'':>14} {line['peak_rss_mb']:12,.0f}   (imports only)")
        summary[engine] = line
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": summary},
                                            indent=2) + "\n")


if __name__ == "__main__":
    main()
