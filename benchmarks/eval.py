"""Our in-process evaluator vs `lm-eval --model hf`, side by side on the same export and task.

The export: a 2-layer d=64 Llama, random init (scores are near chance; the point is speed at
equal numbers), over the full 128,256-token Llama-3 vocabulary (`--vocab llama3`) or a 4,096-token
BPE trained on the task's own text (`--vocab small`), one export per `--seeds` entry; or a named
preset's shape with its own init (`--preset zagreus-0.4b`, for the GPU: `--device cuda`).
The task: the Italian ARC-Challenge test (1169 items) through the offline `zagreus_arc_it`
task, zero-shot. Three sides per seed, each in its own subprocess (so peak memory is its own),
timed twice: the subprocess's whole wall time from process start (imports, task index, model
load, scoring), which is what a user waits for, and from model load to results:
  ours      the `zagreus` model, close calls re-scored in HFLM's layout (zagreus.eval.tiebreak)
  fast      the same with tiebreak=False: the fast pass alone, to show what the tiebreak costs
  hf        lm-eval's HFLM, with the task index lm-eval's CLI builds (its tasks plus ours)
Prints per seed the wall times, speed-ups, acc and acc_norm of each side, whether ours equals
HFLM item by item, the re-scored counts and the largest per-choice log-likelihood difference.

    python benchmarks/eval.py --data-dir ../shared/data/bench --threads 1 [--vocab small] [--seeds 0,1,2,3]
    python benchmarks/eval.py --data-dir DIR --preset zagreus-0.4b --device cuda --json-out results.json
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


def make_export(out: Path, init_std: float, seed: int, vocab: str, data_dir: Path, preset: str | None) -> Path:
    from zagreus.model.config import ModelConfig, resolve_model_config
    from zagreus.model.hf import save_hf
    from zagreus.model.llama import Transformer
    from zagreus.tokenizer import load_tokenizer, train_bpe

    if vocab == "llama3":
        tok = load_tokenizer("llama3")
    else:
        items = json.loads((data_dir / "m_arc_it_test.json").read_text(encoding="utf-8"))
        tok = train_bpe([" ".join(str(v) for v in item.values()) for item in items], 4096, out.parent / "tokenizer")
    if preset:
        cfg = resolve_model_config(preset, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    else:
        cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          intermediate_size=256, max_seq_len=2048, init_std=init_std,
                          bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = Transformer(cfg)
    model.init_weights(seed)
    save_hf(model, tok, out)
    return out


def run_side(side: str, export: Path, data_dir: Path, limit: int | None, batch_size: int, out: Path,
             device: str) -> None:
    """One side in this process, as its user runs it; writes timing, scores and per-item outputs to `out`.

    ours/fast: zagreus' own path (`zagreus eval`: the task index it needs, our scorer).
    hf: lm-eval as its CLI runs it (`lm-eval --model hf --include_path ...`): the full task index
    plus our task folder, then HFLM, through `simple_evaluate` with the same task config.
    """
    start = time.perf_counter()
    if side in ("ours", "fast"):
        from zagreus.eval.lm import make_lm
        from zagreus.eval.run import run_tasks

        lm = make_lm(export, batch_size=batch_size, device=device, tiebreak=side == "ours")
        summary, raw = run_tasks(lm, [TASK], limit=limit, data_dir=data_dir, log_samples=True)
        metrics, tiebreak = summary[TASK]["metrics"], raw["tiebreak"]
    else:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        from zagreus.eval.registry import TASKS_DIR, task_specs

        tasks = TaskManager(include_path=str(TASKS_DIR))
        lm = HFLM(pretrained=str(export), batch_size=batch_size, device=device)
        raw = simple_evaluate(model=lm, tasks=task_specs([TASK], data_dir), limit=limit, task_manager=tasks,
                              log_samples=True, bootstrap_iters=0, verbosity=None)
        metrics = {k.split(",")[0]: v for k, v in raw["results"][TASK].items() if k in ("acc,none", "acc_norm,none")}
        tiebreak = None
    seconds = time.perf_counter() - start
    samples = sorted(raw["samples"][TASK], key=lambda s: s["doc_id"])
    out.write_text(json.dumps({
        "seconds": seconds, "metrics": metrics, "items": len(samples),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "loglikelihoods": [[r[0][0] for r in s["resps"]] for s in samples],
        "per_item": [[s["acc"], s["acc_norm"]] for s in samples], "tiebreak": tiebreak,
    }))


def compare_seed(seed: int, args, env: dict, tmp: Path) -> dict:
    export = make_export(tmp / f"seed{seed}" / "export", args.init_std, seed, args.vocab, args.data_dir, args.preset)
    results = {}
    for side in ("ours", "fast", "hf"):
        out = tmp / f"seed{seed}" / f"{side}.json"
        cmd = [sys.executable, "-P", __file__, "--side", side, "--export", str(export), "--out", str(out),
               "--data-dir", str(args.data_dir), "--batch-size", str(args.batch_size), "--device", args.device]
        cmd += ["--limit", str(args.limit)] if args.limit else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        started = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL)
        results[side] = {**json.loads(out.read_text()), "wall": time.perf_counter() - started}
    return results


def report(seed: int, r: dict) -> bool:
    ours, fast, hf = r["ours"], r["fast"], r["hf"]
    diff = max(abs(a - b) for xs, ys in zip(fast["loglikelihoods"], hf["loglikelihoods"]) for a, b in zip(xs, ys))
    same = ours["per_item"] == hf["per_item"]
    fast_flips = sum(a != b for a, b in zip(fast["per_item"], hf["per_item"]))
    tb = ours["tiebreak"]
    print(f"seed {seed}: {ours['items']} items")
    print(f"  {'':28}{'process s':>10}{'load+score s':>13}{'acc':>9}{'acc_norm':>10}{'peak RSS GB':>13}")
    for name, side in (("zagreus (tiebreak)", ours), ("zagreus fast pass only", fast), ("lm-eval --model hf", hf)):
        m = side["metrics"]
        print(f"  {name:28}{side['wall']:10.1f}{side['seconds']:13.1f}{m['acc']:9.4f}{m['acc_norm']:10.4f}"
              f"{side['peak_rss_gb']:13.2f}")
    print(f"  speed-up vs hf from process start: {hf['wall'] / ours['wall']:.2f}x with tiebreak, "
          f"{hf['wall'] / fast['wall']:.2f}x fast pass only")
    print(f"  speed-up vs hf from model load: {hf['seconds'] / ours['seconds']:.2f}x with tiebreak, "
          f"{hf['seconds'] / fast['seconds']:.2f}x fast pass only; tiebreak cost "
          f"{tb['seconds']:.1f} s measured inside (difference of the two runs {ours['seconds'] - fast['seconds']:+.1f} s)")
    print(f"  re-scored: {sum(tb['rescored_items'].values())} close items ({tb['rescored_requests']} requests) "
          f"+ {tb['calibrated']} calibration requests of {tb['requests']}; bound {tb['per_token_bound']:.2e}/token")
    print(f"  items whose acc/acc_norm differ from hf: {fast_flips} fast pass only, "
          f"{sum(a != b for a, b in zip(ours['per_item'], hf['per_item']))} with tiebreak; "
          f"identical per item: {same}; max |ll difference| fast vs hf: {diff:.2e}")
    return same


# Every side runs offline, one tokenizer thread (the benchmarks pin torch's threads themselves).
SIDE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def parse_shared_arguments(parser: argparse.ArgumentParser, sides: list[str]) -> argparse.Namespace:
    """Add the options both evaluation benchmarks take (model shape, device, output, and the hidden
    ones a side's subprocess gets), parse, and set up logging and torch's threads."""
    parser.add_argument("--preset", help="a model preset's shape and init instead of the 2-layer d=64 model")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, both sides")
    parser.add_argument("--json-out", type=Path, help="also write the figures here")
    parser.add_argument("--side", choices=sides, help=argparse.SUPPRESS)
    parser.add_argument("--export", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/bench")
    parser.add_argument("--limit", type=int, default=None, help="items (default: all 1169)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default torch's)")
    parser.add_argument("--init-std", type=float, default=0.2, help="a wide init keeps choices' scores apart")
    parser.add_argument("--vocab", choices=["llama3", "small"], default="llama3")
    parser.add_argument("--seeds", default="0", help="comma-separated model seeds, one export each")
    args = parse_shared_arguments(parser, sides=["ours", "fast", "hf"])
    if args.side:
        run_side(args.side, args.export, args.data_dir, args.limit, args.batch_size, args.out, args.device)
        return
    if not (args.data_dir / "m_arc_it_test.json").is_file():
        sys.exit(f"{args.data_dir}/m_arc_it_test.json not found; pass --data-dir (see ../shared/data/README.md)")
    env = {**os.environ, **SIDE_ENV}
    print(f"task {TASK}, vocab {args.vocab}, model {args.preset or '2-layer d=64'}, device {args.device}, "
          f"batch {args.batch_size}, threads {args.threads or 'default'}")
    identical, figures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(x) for x in args.seeds.split(",")):
            results = compare_seed(seed, args, env, Path(tmp))
            identical.append(report(seed, results))
            figures.append({"seed": seed, "identical_per_item": identical[-1],
                            **{side: {k: r[k] for k in ("wall", "seconds", "metrics", "peak_rss_gb", "tiebreak")}
                               for side, r in results.items()}})
    print(f"identical to lm-eval hf per item on {sum(identical)} of {len(identical)} seeds")
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
