"""Pretraining throughput on one GPU: tokens/s and MFU of zagreus beside transformers' Llama.

The authors' Zagreus-0.4B pretraining ran at 699 tokens/s per GPU, 15.4 TFLOP/s (the training-log
excerpt in their repository README, github.com/mii-llm/zagreus-nesso-slm, on A100s; not in the
report's text), about 5% of an A100's 312 TFLOP/s dense bf16 (our arithmetic);
issue 5 targets >= 45% MFU on an H100/H200. Both sides train the same shape with the same
recipe: AdamW (fused), bf16 autocast, torch.compile, random tokens, `--steps` timed steps after
`--warmup` untimed ones (compilation happens there). MFU = training FLOPs per token (PaLM-style,
ModelConfig.flops_per_token, attention included) x tokens/s / peak, the peak being the dense
bf16 figure of an H100/H200 SXM, 989 TFLOP/s.

    python benchmarks/gpu_mfu.py                   # zagreus-0.4b, seq 4096, micro-batch 4, 30 steps
    python benchmarks/gpu_mfu.py --smoke           # tiny shape on CPU: checks the script end to end
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import time

import torch

from zagreus.model.config import ModelConfig, resolve_model_config
from zagreus.model.llama import build_model
from zagreus.recipe import OptimizerSection
from zagreus.train.loop import compute_loss
from zagreus.train.optim import build_optimizer
from zagreus.train.parallel import ParallelDims, parallelize

log = logging.getLogger("gpu_mfu")
H100_BF16_DENSE = 989e12


def _batches(cfg: ModelConfig, args, device: torch.device, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1), generator=gen).to(device) for _ in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(step, batches: list[torch.Tensor], warmup: int, device: torch.device) -> float:
    """Seconds for the steps after `warmup` (compilation and allocator warm-up excluded)."""
    for tokens in batches[:warmup]:
        step(tokens)
    _sync(device)
    t0 = time.perf_counter()
    for tokens in batches[warmup:]:
        step(tokens)
    _sync(device)
    return time.perf_counter() - t0


def run_zagreus(cfg: ModelConfig, args, device: torch.device, autocast) -> float:
    model = build_model(cfg, device, seed=0)
    parallel = parallelize(model, ParallelDims(), None, device, compile=args.compile, autocast=autocast,
                           activation_checkpointing=args.ac,
                           model_loss=lambda m, x, y: compute_loss(m, {"input": x, "target": y}, args.loss_chunk))
    opt = build_optimizer(parallel.model, OptimizerSection())

    def step(tokens: torch.Tensor) -> None:
        parallel.forward_backward([(tokens[:, :-1], tokens[:, 1:])])
        parallel.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        return _timed(step, _batches(cfg, args, device, args.warmup + args.steps), args.warmup, device)
    finally:
        del parallel, model, opt


def run_transformers(cfg: ModelConfig, args, device: torch.device, autocast) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    from zagreus.model.hf import to_llama_config

    model = LlamaForCausalLM(LlamaConfig(**to_llama_config(cfg))).to(device)
    model.train()
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01,
                            fused=device.type == "cuda")

    def step(tokens: torch.Tensor) -> None:
        with autocast():
            # transformers shifts the labels itself: seq + 1 tokens give seq predictions.
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        return _timed(step, _batches(cfg, args, device, args.warmup + args.steps), args.warmup, device)
    finally:
        del model, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="zagreus-0.4b")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    ap.add_argument("--loss-chunk", type=int, default=4096)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE / 1e12, help="bf16 dense peak per GPU")
    ap.add_argument("--no-peer", dest="peer", action="store_false", help="skip transformers' LlamaForCausalLM")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, CPU allowed, few steps: checks the script runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    if args.smoke:
        cfg = resolve_model_config("tiny", vocab_size=512, hidden_size=64, n_layers=2, intermediate_size=128)
        args.seq, args.micro_batch, args.steps, args.warmup = 64, 2, 3, 2
    else:
        cfg = resolve_model_config(args.preset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no CUDA device: this benchmark needs a GPU (use --smoke to check the script on CPU)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
        card = torch.cuda.get_device_name()
    else:
        torch.set_num_threads(2)
        autocast = contextlib.nullcontext  # no native bf16 on these CPUs: fp32
        card = "cpu"

    flops_per_token = cfg.flops_per_token(args.seq)
    tokens = args.steps * args.micro_batch * args.seq
    results = {}
    sides = [("zagreus", run_zagreus)] + ([("transformers", run_transformers)] if args.peer else [])
    for name, fn in sides:
        log.info("%s: %s, seq %d, micro-batch %d, %d+%d steps, compile %s on %s", name, args.preset if not args.smoke
                 else "smoke", args.seq, args.micro_batch, args.warmup, args.steps, args.compile, card)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = fn(cfg, args, device, autocast)
        tok_s = tokens / seconds
        results[name] = {"tokens_per_s": tok_s, "step_s": seconds / args.steps,
                         "tflops": flops_per_token * tok_s / 1e12, "mfu": flops_per_token * tok_s / (args.peak_tflops * 1e12),
                         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"card: {card}; model {args.preset if not args.smoke else 'smoke'} "
          f"({cfg.param_counts()['total']:,} parameters), seq {args.seq}, micro-batch {args.micro_batch}, "
          f"{flops_per_token / 1e9:.2f} GFLOP/token, peak {args.peak_tflops:.0f} TFLOP/s")
    for name, r in results.items():
        mem = f", peak memory {r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else ""
        print(f"{name:>12}: {r['tokens_per_s']:,.0f} tokens/s, {r['step_s'] * 1e3:.0f} ms/step, "
              f"{r['tflops']:.1f} TFLOP/s, MFU {r['mfu']:.1%}{mem}")
    if "transformers" in results:
        print(f"       ratio: zagreus / transformers = {results['zagreus']['tokens_per_s'] / results['transformers']['tokens_per_s']:.2f}x")
    print("     authors: 699 tokens/s per A100, 15.4 TFLOP/s (their README's training log; ~5% of peak); target >= 45% MFU")
    print(json.dumps({"card": card, "seq": args.seq, "micro_batch": args.micro_batch, "results": results}))


if __name__ == "__main__":
    main()
