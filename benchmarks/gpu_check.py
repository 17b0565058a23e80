"""The GPU check (issue 19) in one call of at most 8 minutes: one JSON and one Markdown table.

Four parts, each in its own process (its own GPU memory, its own time limit), most important first:
  train  the zagreus-0.4b training step at seq 4096, micro-batch 4, bf16 and torch.compile, beside
         transformers' LlamaForCausalLM of the same shape (benchmarks/gpu_mfu.py): tokens/s, MFU
         against the H100/H200 dense bf16 peak of 989 TFLOP/s, peak memory.
         Targets: MFU >= 50%, >= 1.3x transformers' tokens/s.
  nccl   `torchrun --nproc-per-node 1`: NCCL, the model built on the meta device, FSDP2 (a one-rank
         mesh) with bf16 parameters and fp32 reduction, 20 steps; the same 20 steps without
         torch.distributed under bf16 autocast. Target: the two loss curves agree within bf16
         tolerance (relative 2e-2 per step).
  eval   our evaluator against `lm-eval --model hf` on the GPU (benchmarks/eval.py), a random
         zagreus-0.4b export, the Italian ARC-Challenge test (1169 items). Targets: >= 5x, identical
         acc and acc_norm item by item.
  serve  `zagreus serve --batch` on the GPU with 64 concurrent streaming requests
         (benchmarks/serve_load.py): tokens/s, p50/p95 latency. Reported, no target.

On the GPU machine (python 3.12, torch 2.11, no pydantic / lm-eval / llama-models there):
    here, once:   bash benchmarks/gpu_wheels.sh            # wheels of what the device lacks, into .whl/
                  mkdir -p .bench && cp ../shared/data/bench/m_arc_it_*.json ../shared/data/handbook-5lang.jsonl .bench/
                  echo /.bench/ >> .git/info/exclude
    device run (carry .whl and .bench, timeout 540):
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
      PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --data-dir .bench \
        --handbook .bench/handbook-5lang.jsonl --out $OUT

    python benchmarks/gpu_check.py --smoke --out /tmp/gpu-check   # tiny shapes on CPU: the script end to end
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUDGET_S = 480  # the "one call of at most 8 minutes"
# Each part's own limit; a part also stops when the whole budget is spent.
PART_LIMITS = {"train": 200, "nccl": 90, "eval": 170, "serve": 90}
NCCL_STEPS = 20
BF16_REL_TOL = 2e-2


# --- the NCCL part's worker (runs under torchrun) --------------------------------------------------
def nccl_worker(smoke: bool, out: Path) -> None:
    """20 steps under FSDP2 on a one-rank mesh, then the same 20 without torch.distributed."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from zagreus.devices import autocast
    from zagreus.model.config import resolve_model_config
    from zagreus.model.llama import build_model, materialize, meta_model
    from zagreus.recipe import OptimizerSection
    from zagreus.train.loop import compute_loss
    from zagreus.train.optim import build_optimizer
    from zagreus.train.parallel import MESH_DIMS, ParallelDims, ParallelModel, apply_data_parallel

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    if smoke:
        cfg = resolve_model_config("tiny", vocab_size=512, hidden_size=64, n_layers=2, intermediate_size=128)
        seq, micro = 64, 2
    else:
        cfg, seq, micro = resolve_model_config("zagreus-0.4b"), 4096, 4
    gen = torch.Generator().manual_seed(0)
    # Four batches seen five times each: the loss falls, so the curves have a shape to compare.
    batches = [torch.randint(0, cfg.vocab_size, (micro, seq + 1), generator=gen).to(device) for _ in range(4)]
    compute_dtype = torch.bfloat16 if cuda else torch.float32

    def train(parallel: ParallelModel) -> list[float]:
        opt = build_optimizer(parallel.model, OptimizerSection(lr=1e-3))
        losses = []
        for step in range(NCCL_STEPS):
            tokens = batches[step % len(batches)]
            losses.append(parallel.forward_backward([(tokens[:, :-1], tokens[:, 1:])]).item())
            parallel.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return losses

    def loss(m, x, y):
        return compute_loss(m, {"input": x, "target": y}, 4096)

    mesh = init_device_mesh(device.type, (1, 1, 1, 1), mesh_dim_names=MESH_DIMS)
    sharded = meta_model(cfg)
    apply_data_parallel(sharded, ParallelDims(), mesh, param_dtype=compute_dtype, reduce_dtype=torch.float32)
    materialize(sharded, device, seed=0)
    t0 = time.perf_counter()
    fsdp = train(ParallelModel(sharded, ParallelDims(), mesh, device, model_loss=loss))
    fsdp_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del sharded
    plain = build_model(cfg, device, seed=0)
    reference = train(ParallelModel(plain, ParallelDims(), None, device, model_loss=loss,
                                    autocast=lambda: autocast(device)))
    rel = max(abs(a - b) / abs(b) for a, b in zip(fsdp, reference))
    out.write_text(json.dumps({"backend": dist.get_backend(), "steps": NCCL_STEPS, "fsdp_losses": fsdp,
                               "plain_losses": reference, "max_rel_diff": rel, "fsdp_seconds": fsdp_s,
                               "fsdp_peak_gib": peak}))
    dist.destroy_process_group()


# --- running the parts ------------------------------------------------------------------------------
def _run(cmd: list[str], limit: float, env: dict) -> tuple[int, str]:
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
        return done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        return 124, out + f"\n[stopped at its limit of {limit:.0f} s]"


def part_train(args, tmp: Path, limit: float, env: dict) -> dict:
    cmd = [sys.executable, str(HERE / "gpu_mfu.py")] + (["--smoke"] if args.smoke else [])
    rc, out = _run(cmd, limit, env)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if rc or not lines:
        return {"error": out[-3000:], "rc": rc}
    r = json.loads(lines[-1])["results"]
    z, t = r["zagreus"], r.get("transformers")
    return {"zagreus": z, "transformers": t, "ratio": z["tokens_per_s"] / t["tokens_per_s"] if t else None}


def part_nccl(args, tmp: Path, limit: float, env: dict) -> dict:
    out = tmp / "nccl.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", str(Path(__file__)),
           "--worker", "nccl", "--worker-out", str(out)] + (["--smoke"] if args.smoke else [])
    rc, text = _run(cmd, limit, env)
    if rc or not out.is_file():
        return {"error": text[-3000:], "rc": rc}
    return json.loads(out.read_text())


def part_eval(args, tmp: Path, limit: float, env: dict) -> dict:
    out = tmp / "eval.json"
    cmd = [sys.executable, str(HERE / "eval.py"), "--data-dir", str(args.data_dir), "--json-out", str(out)]
    cmd += ["--vocab", "small", "--limit", "40", "--threads", "1"] if args.smoke else \
        ["--preset", "zagreus-0.4b", "--device", "cuda", "--batch-size", "32"]
    rc, text = _run(cmd, limit, env)
    if rc or not out.is_file():
        return {"error": text[-3000:], "rc": rc}
    r = json.loads(out.read_text())[0]
    return {"ratio": r["hf"]["seconds"] / r["ours"]["seconds"], "ratio_from_process_start": r["hf"]["wall"] / r["ours"]["wall"],
            "identical_per_item": r["identical_per_item"],
            "ours": r["ours"], "hf": r["hf"], "output": text[-1500:]}


def part_serve(args, tmp: Path, limit: float, env: dict) -> dict:
    out = tmp / "serve.json"
    cmd = [sys.executable, str(HERE / "serve_load.py"), "--batch-only", "--json-out", str(out),
           "--handbook", str(args.handbook)]
    # The server takes the GPU by itself (`zagreus serve --device auto`).
    cmd += ["--requests", "8", "--max-tokens", "16"] if args.smoke else \
        ["--requests", "64", "--max-tokens", "128", "--preset", "zagreus-0.4b"]
    rc, text = _run(cmd, limit, env)
    if rc or not out.is_file():
        return {"error": text[-3000:], "rc": rc}
    return {**json.loads(out.read_text()), "output": text[-1500:]}


PARTS = {"train": part_train, "nccl": part_nccl, "eval": part_eval, "serve": part_serve}


def table(results: dict, smoke: bool) -> str:
    """The Markdown summary: one row per check, with its target and whether it was met."""
    rows = ["| check | measured | target | met |", "|---|---|---|---|"]

    def row(check: str, measured: str, target: str, met: bool | None) -> None:
        rows.append(f"| {check} | {measured} | {target} | {'n/a' if met is None else ('yes' if met else 'NO')} |")

    for name, r in results.items():
        if "error" in r:
            row(name, f"failed (rc {r['rc']}): {r['error'].strip().splitlines()[-1][:150] if r['error'].strip() else ''}",
                "runs", False)
        elif name == "train":
            z = r["zagreus"]
            mem = f", peak {z['peak_mem_gib']:.1f} GiB" if z.get("peak_mem_gib") is not None else ""
            row("training step, zagreus", f"{z['tokens_per_s']:,.0f} tokens/s, MFU {z['mfu']:.1%}{mem}",
                "MFU >= 50%", None if smoke else z["mfu"] >= 0.5)
            if r["transformers"]:
                row("training step vs transformers", f"{r['ratio']:.2f}x ({r['transformers']['tokens_per_s']:,.0f} "
                    f"tokens/s)", ">= 1.3x", None if smoke else r["ratio"] >= 1.3)
        elif name == "nccl":
            row(f"{r['backend']} + FSDP2, {r['steps']} steps vs no torch.distributed",
                f"max relative loss difference {r['max_rel_diff']:.2e}", f"<= {BF16_REL_TOL:g}",
                r["max_rel_diff"] <= BF16_REL_TOL)
        elif name == "eval":
            m, h = r["ours"]["metrics"], r["hf"]["metrics"]
            row("eval vs lm-eval hf", f"{r['ratio']:.2f}x; acc {m['acc']:.4f}/{h['acc']:.4f}, acc_norm "
                f"{m['acc_norm']:.4f}/{h['acc_norm']:.4f}; identical per item: {r['identical_per_item']}",
                ">= 5x, identical", None if smoke else (r["ratio"] >= 5 and r["identical_per_item"]))
        elif name == "serve":
            row("serve --batch, concurrent streams", f"{r.get('tokens_per_s', float('nan')):,.0f} tokens/s, p50 "
                f"{r.get('p50_s', float('nan')):.2f} s, p95 {r.get('p95_s', float('nan')):.2f} s", "reported", None)
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=False, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--data-dir", type=Path, default=HERE.parents[1] / "shared" / "data" / "bench",
                    help="folder with m_arc_it_test.json (the eval part)")
    ap.add_argument("--handbook", type=Path, default=HERE.parents[1] / "shared" / "data" / "handbook-5lang.jsonl",
                    help="the serve part's prompts")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script end to end")
    ap.add_argument("--worker", choices=["nccl"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        nccl_worker(args.smoke, args.worker_out)
        return
    if args.out is None:
        ap.error("--out is required")
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("no CUDA device: this check needs a GPU (use --smoke to run the script on CPU)")
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in parts:
            left = BUDGET_S - (time.perf_counter() - start)
            if left < 20:
                results[name] = {"error": "not run: the 8-minute budget was spent", "rc": -1}
                continue
            t0 = time.perf_counter()
            results[name] = PARTS[name](args, Path(tmp), min(PART_LIMITS[name], left), env)
            results[name]["seconds"] = time.perf_counter() - t0
            print(f"[{time.perf_counter() - start:5.0f} s] {name}: "
                  f"{'FAILED' if 'error' in results[name] else 'done'} in {results[name]['seconds']:.0f} s", flush=True)
    summary = {"card": card, "torch": torch.__version__, "smoke": args.smoke,
               "seconds": time.perf_counter() - start, "results": results}
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    md = f"GPU check on {card}, torch {torch.__version__}, {summary['seconds']:.0f} s\n\n" + table(results, args.smoke)
    (args.out / "gpu_check.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
