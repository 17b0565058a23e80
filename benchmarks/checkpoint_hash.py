"""What the checksums in meta.json cost: a zagreus-0.4b checkpoint (model + AdamW state) saved, then hashed.

The model (437,760,960 parameters) and its AdamW moments are saved with save_checkpoint into a
temporary folder, with and without the hashing rank 0 does after the barrier (both timed, best
of --repeat). Then the files are hashed again on their own, page cache warm as right after a
save, with xxh3-128 (what checkpoints record) and, for comparison, hashlib's blake2b.

    python benchmarks/checkpoint_hash.py [--preset zagreus-0.4b] [--repeat 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import xxhash

from zagreus import checkpoint
from zagreus.model.config import resolve_model_config
from zagreus.model.llama import build_model
from zagreus.recipe import OptimizerSection
from zagreus.train.optim import build_optimizer


def best(seconds: list[float]) -> str:
    return f"{min(seconds):.2f} s (runs: {', '.join(f'{s:.2f}' for s in seconds)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="zagreus-0.4b")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (default: the temp folder)")
    args = parser.parse_args()

    model = build_model(resolve_model_config(args.preset), seed=0)
    optimizer = build_optimizer(model, OptimizerSection())
    for p in model.parameters():  # one step on zero gradients: AdamW's moments exist, as in any real checkpoint
        p.grad = torch.zeros_like(p)
    optimizer.step()
    root = Path(tempfile.mkdtemp(prefix="ckpt-hash-", dir=args.dir))
    try:
        timings: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(args.repeat):
            for kind in ("without", "with"):
                shutil.rmtree(root / "checkpoints", ignore_errors=True)
                digest = checkpoint.file_digest if kind == "with" else (lambda path: "")
                with mock.patch.object(checkpoint, "file_digest", digest):
                    t0 = time.perf_counter()
                    saved = checkpoint.save_checkpoint(root / "checkpoints", 1, model, optimizer, {})
                    timings[kind].append(time.perf_counter() - t0)
        files = [p for p in saved.iterdir() if p.name != "meta.json"]
        size = sum(p.stat().st_size for p in files)
        print(f"{args.preset}: {sum(p.numel() for p in model.parameters()):,} parameters, checkpoint "
              f"{size / 1e9:.2f} GB in {len(files)} files")
        print(f"save_checkpoint without hashing: {best(timings['without'])}")
        print(f"save_checkpoint with xxh3-128:   {best(timings['with'])}")
        for name, new in (("xxh3-128", xxhash.xxh3_128), ("blake2b", hashlib.blake2b)):
            seconds = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                for p in files:
                    checkpoint.file_digest(p, new)
                seconds.append(time.perf_counter() - t0)
            print(f"{name} alone: {best(seconds)}, {size / min(seconds) / 1e9:.1f} GB/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
