"""Generation tasks: our generate_until (batched, KV cache) vs `lm-eval --model hf`, side by side.

IFEval-style prompts (written here: the IFEval data is not in ../shared/data, and lm-eval's
ifeval task needs langdetect and nltk's punkt data besides), each sent as lm-eval's ifeval
task sends it: generate_until with until [] (only end of text stops a reply), greedy,
max_gen_toks 1280 (`--max-gen-toks`, default 256 here). The export is the one
benchmarks/eval.py builds (its `make_export`): a 2-layer d=64 random model over the
128,256-token Llama-3 vocabulary (`--vocab llama3`) or a 4,096-token BPE (`--vocab small`, trained
here on the prompts and the shared data's English handbook pages), or a preset's shape
(`--preset zagreus-0.4b --device cuda`).
Two sides per vocabulary, each in its own subprocess, both calling the LM's generate_until on
the same requests, at the same batch size:
  ours      the `zagreus` model (zagreus.eval.lm.ZagreusLM)
  hf        lm-eval's HFLM (transformers' generate)
Each is timed from process start (interpreter, imports, model load, generation: what a user
waits for) and from model load to the last reply. Prints the wall times, the speed-ups, reply
tokens per second (the replies re-encoded, no BOS: one count for both sides) and how many
replies are identical to HFLM's.

    python benchmarks/eval_generate.py --threads 1 [--vocab llama3,small] [--limit 50] [--max-gen-toks 1280]
    python benchmarks/eval_generate.py --preset zagreus-0.4b --device cuda --vocab llama3 --json-out gen.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval import SIDE_ENV, make_export, parse_shared_arguments  # noqa: E402  (benchmarks/eval.py: the same exports)

HANDBOOK = Path(__file__).resolve().parents[2] / "shared/data/handbook-5lang.jsonl"

# IFEval-style: a task, then one to three verifiable instructions (IFEval's families: format,
# length, case, keywords, punctuation, start/end, language); some with a passage to work on.
TASKS = [
    "Write a haiku about the first snow of winter.",
    "Write a short story about a robot that learns to paint.",
    "Write a cover letter for a job at a small bakery in Lisbon.",
    "Explain quantum computing to a five year old.",
    "Write a blog post about the benefits of sleeping in a hammock.",
    "Write a limerick about a cat who refuses to get off the keyboard.",
    "Give me a recipe for pancakes that a beginner can follow.",
    "Write an email to my landlord asking to fix the heating.",
    "Describe the water cycle for a middle school science class.",
    "Write a product description for a solar-powered backpack.",
    "Write a persuasive essay on why cities should plant more trees.",
    "Summarize the plot of Romeo and Juliet.",
    "Write a rap song about the history of the printing press.",
    "Write a dialogue between a barista and a customer who cannot decide what to order.",
    "What are the pros and cons of working from home?",
    "Write a riddle whose answer is 'a shadow'.",
    "Plan a three-day trip to Kyoto for a family with two teenagers.",
    "Write a speech for a best man at a wedding who is very nervous.",
    "Explain how a bill becomes a law in the United States.",
    "Write a review of a fictional restaurant that serves only soup.",
    "Write a poem about a lonely lighthouse keeper.",
    "Write a job advertisement for a marine biologist.",
    "Write a startup pitch for an app that reminds people to water their plants.",
    "Write a letter to a friend who moved to another country.",
    "Explain the difference between weather and climate.",
]
INSTRUCTIONS = [
    "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
    "Do not include any commas in your response.",
    "Your response should contain at least 300 words.",
    "Answer with less than 80 words.",
    "Highlight at least 3 sections in your answer with markdown, i.e. *highlighted section*.",
    "Your answer must contain exactly 4 bullet points. Use the markdown bullet points such as:\n* This is point 1.\n"
    "* This is point 2",
    "Finish your response with this exact phrase 'Is there anything else I can help with?'. "
    "No other words should follow this phrase.",
    "Wrap your entire response with double quotation marks.",
    "Your response must have 3 sections. Mark the beginning of each section with SECTION X, such as: SECTION 1.",
    "Include the keywords 'river', 'lantern' and 'copper' in the response.",
    "There should be 4 paragraphs. Paragraphs are separated with the markdown divider: ***",
    "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
    "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.",
    "At the end of your response, please explicitly add a postscript starting with P.S.",
    "Your ENTIRE response should be in Italian language, no other language is allowed.",
    "In your response, the word 'because' should appear at least 3 times.",
]
PASSAGE = ("The Raymond III, Count of Tripoli, was a twelfth-century nobleman who ruled the County of Tripoli and, "
           "for two periods, acted as regent of the Kingdom of Jerusalem. He was captured in battle, spent eight "
           "years as a prisoner in Aleppo, and after his release became one of the most powerful barons of the "
           "kingdom, opposing the party of Guy of Lusignan. ")


def ifeval_prompts(n: int = 100) -> list[str]:
    """n prompts: task k with one to three instructions, every fifth one on a passage of 1-4 paragraphs."""
    prompts = []
    for k in range(n):
        task = TASKS[k % len(TASKS)]
        picked = [INSTRUCTIONS[(k * 7 + j * 5) % len(INSTRUCTIONS)] for j in range(1 + k % 3)]
        text = " ".join([task] + picked)
        if k % 5 == 4:
            text = f"Read the passage below, then answer.\n\n{PASSAGE * (1 + k % 4)}\n\n{text}"
        prompts.append(text)
    return prompts


def run_side(side: str, export: Path, limit: int, max_gen_toks: int, batch_size: int, out: Path,
             device: str) -> None:
    """One side in this process: generate_until on the requests lm-eval's ifeval task makes; replies to `out`."""
    from lm_eval.api.instance import Instance

    start = time.perf_counter()
    if side == "ours":
        from zagreus.eval.lm import make_lm

        lm = make_lm(export, batch_size=batch_size, device=device)
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=str(export), batch_size=batch_size, device=device)
    kwargs = {"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": max_gen_toks}
    requests = [Instance("generate_until", {}, (p, dict(kwargs, until=[])), i)
                for i, p in enumerate(ifeval_prompts()[:limit])]
    loaded = time.perf_counter()
    replies = lm.generate_until(requests, disable_tqdm=True)
    end = time.perf_counter()
    out.write_text(json.dumps({"seconds": end - start, "generate_seconds": end - loaded, "replies": replies,
                               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def compare(vocab: str, args, env: dict, tmp: Path) -> dict:
    data_dir = tmp / vocab / "data"
    data_dir.mkdir(parents=True)
    # make_export trains the small BPE on the text of m_arc_it_test.json's items: here, the prompts
    # and, when ../shared/data has it, the English pages of the Debian handbook (else the BPE stays small).
    texts = ifeval_prompts()
    if HANDBOOK.is_file():
        with HANDBOOK.open(encoding="utf-8") as f:
            texts += [d["text"] for d in map(json.loads, f) if d["lang"] == "en"]
    (data_dir / "m_arc_it_test.json").write_text(json.dumps([{"text": t} for t in texts]))
    export = make_export(tmp / vocab / "export", args.init_std, args.seed, vocab, data_dir, args.preset)
    results = {}
    for side in ("ours", "hf"):
        out = tmp / vocab / f"{side}.json"
        cmd = [sys.executable, "-P", __file__, "--side", side, "--export", str(export), "--out", str(out),
               "--limit", str(args.limit), "--max-gen-toks", str(args.max_gen_toks),
               "--batch-size", str(args.batch_size), "--device", args.device]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        started = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL)
        results[side] = {**json.loads(out.read_text()), "wall": time.perf_counter() - started}
    from zagreus.tokenizer import load_tokenizer

    tok = load_tokenizer(str(export))
    results["vocab_size"] = tok.vocab_size
    for r in (results["ours"], results["hf"]):
        r["reply_tokens"] = sum(len(tok.encode(t, allow_special=True)) for t in r["replies"])
    return results


def report(vocab: str, r: dict) -> dict:
    ours, hf = r["ours"], r["hf"]
    same = sum(a == b for a, b in zip(ours["replies"], hf["replies"]))
    n = len(ours["replies"])
    print(f"vocab {vocab} ({r['vocab_size']:,} tokens): {n} prompts")
    print(f"  {'':22}{'process s':>10}{'load+gen s':>12}{'gen s':>9}{'reply tokens':>14}{'tokens/s':>10}"
          f"{'peak RSS GB':>13}")
    for name, side in (("zagreus", ours), ("lm-eval --model hf", hf)):
        print(f"  {name:22}{side['wall']:10.1f}{side['seconds']:12.1f}{side['generate_seconds']:9.1f}"
              f"{side['reply_tokens']:14d}{side['reply_tokens'] / side['generate_seconds']:10.1f}"
              f"{side['peak_rss_gb']:13.2f}")
    print(f"  speed-up vs hf: {hf['wall'] / ours['wall']:.2f}x from process start, "
          f"{hf['seconds'] / ours['seconds']:.2f}x from model load, "
          f"{hf['generate_seconds'] / ours['generate_seconds']:.2f}x generation alone")
    # Where a reply differs: the prompt and the first character that differs (a near-tie of two
    # logits late in a long reply flips with the batch's padding, in either implementation).
    differ = [(i, next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
              for i, (a, b) in enumerate(zip(ours["replies"], hf["replies"])) if a != b]
    print(f"  replies identical to hf: {same} / {n}"
          + (f"; differing (prompt, first differing character): {differ}" if differ else ""))
    return {"vocab": vocab, "vocab_size": r["vocab_size"], "prompts": n, "identical": same, "differ": differ,
            **{side: {k: r[side][k] for k in ("wall", "seconds", "generate_seconds", "reply_tokens", "peak_rss_gb")} for side in ("ours", "hf")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=100, help="prompts (default: all 100)")
    parser.add_argument("--max-gen-toks", type=int, default=256, help="tokens per reply at most (ifeval's: 1280)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default torch's)")
    parser.add_argument("--init-std", type=float, default=0.2, help="a wide init keeps argmax margins clear")
    parser.add_argument("--vocab", default="llama3,small", help="comma-separated: llama3 (128,256), small (4,096 BPE)")
    parser.add_argument("--seed", type=int, default=0, help="model seed")
    args = parse_shared_arguments(parser, sides=["ours", "hf"])
    if args.side:
        run_side(args.side, args.export, args.limit, args.max_gen_toks, args.batch_size, args.out, args.device)
        return
    env = {**os.environ, **SIDE_ENV}
    print(f"ifeval-style generate_until: {args.limit} prompts, greedy, until [], max_gen_toks {args.max_gen_toks}, "
          f"model {args.preset or '2-layer d=64'}, device {args.device}, batch {args.batch_size}, "
          f"threads {args.threads or 'default'}")
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in args.vocab.split(","):
            figures.append(report(vocab, compare(vocab, args, env, Path(tmp))))
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "figures": figures},
                                            indent=1))


if __name__ == "__main__":
    main()
