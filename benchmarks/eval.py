"""Our in-process evaluator vs `lm-eval --model hf`, side by side on the same export and task.

The export: a 2-layer d=64 Llama with the full 128,256-token Llama-3 vocabulary, random init
(scores are near chance; the point is speed at equal numbers). The task: the Italian
ARC-Challenge test (1169 items) through the offline `zagreus_arc_it` task, zero-shot.
Each side runs in its own subprocess (so peak memory is its own), timed from model load to
results, after lm-eval's task index is built. Prints both wall times, the ratio, both scores
(acc, acc_norm), the largest per-choice log-likelihood difference and both peak RSS.

    python benchmarks/eval.py --data-dir ../shared/data/bench [--limit N] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench.eval")
TASK = "zagreus_arc_it"


def make_export(out: Path, init_std: float, seed: int = 0) -> Path:
    from zagreus.model.config import ModelConfig
    from zagreus.model.hf import save_hf
    from zagreus.model.llama import Transformer
    from zagreus.tokenizer import load_tokenizer

    tok = load_tokenizer("llama3")
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      intermediate_size=256, max_seq_len=2048, init_std=init_std)
    model = Transformer(cfg)
    model.init_weights(seed)
    save_hf(model, tok, out)
    return out


def run_side(side: str, export: Path, data_dir: Path, limit: int | None, batch_size: int, out: Path) -> None:
    """One side in this process; writes timing, scores and per-choice log-likelihoods to `out`."""
    from zagreus.eval.registry import task_manager
    from zagreus.eval.run import run_tasks

    task_manager()  # the task index costs the same for both sides; keep it out of the timing
    start = time.perf_counter()
    if side == "ours":
        from zagreus.eval.lm import make_lm

        lm = make_lm(export, batch_size=batch_size)
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=str(export), batch_size=batch_size, device="cpu")
    summary, raw = run_tasks(lm, [TASK], limit=limit, data_dir=data_dir, log_samples=True)
    seconds = time.perf_counter() - start
    lls = [[r[0][0] for r in s["resps"]] for s in sorted(raw["samples"][TASK], key=lambda s: s["doc_id"])]
    out.write_text(json.dumps({
        "seconds": seconds, "metrics": summary[TASK]["metrics"], "items": summary[TASK]["samples"],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "loglikelihoods": lls,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/bench")
    parser.add_argument("--limit", type=int, default=None, help="items (default: all 1169)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default torch's)")
    parser.add_argument("--init-std", type=float, default=0.2, help="a wide init keeps choices' scores apart")
    parser.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--export", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.side:
        run_side(args.side, args.export, args.data_dir, args.limit, args.batch_size, args.out)
        return
    if not (args.data_dir / "m_arc_it_test.json").is_file():
        sys.exit(f"{args.data_dir}/m_arc_it_test.json not found; pass --data-dir (see ../shared/data/README.md)")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        export = make_export(Path(tmp) / "export", args.init_std)
        results = {}
        for side in ("ours", "hf"):
            out = Path(tmp) / f"{side}.json"
            cmd = [sys.executable, "-P", __file__, "--side", side, "--export", str(export), "--out", str(out),
                   "--data-dir", str(args.data_dir), "--batch-size", str(args.batch_size)]
            cmd += ["--limit", str(args.limit)] if args.limit else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL)
            results[side] = json.loads(out.read_text())
    ours, hf = results["ours"], results["hf"]
    diff = max(abs(a - b) for xs, ys in zip(ours["loglikelihoods"], hf["loglikelihoods"]) for a, b in zip(xs, ys))
    print(f"task {TASK}: {ours['items']} items, batch {args.batch_size}, threads {args.threads or 'default'}")
    print(f"{'':22}{'wall s':>9}{'acc':>9}{'acc_norm':>10}{'peak RSS GB':>13}")
    for name, r in (("zagreus (in process)", ours), ("lm-eval --model hf", hf)):
        m = r["metrics"]
        print(f"{name:22}{r['seconds']:9.1f}{m['acc']:9.4f}{m['acc_norm']:10.4f}{r['peak_rss_gb']:13.2f}")
    print(f"speed-up: {hf['seconds'] / ours['seconds']:.2f}x; identical scores: {ours['metrics'] == hf['metrics']}; "
          f"max |log-likelihood difference| per choice: {diff:.2e}")


if __name__ == "__main__":
    main()
