"""Training metrics: the console line, metrics.jsonl and TensorBoard, plus MFU and bits per byte.

metrics.jsonl holds one JSON record per logged step ({"step", "loss", "lr", ...}) and per
evaluation ({"step", "val_loss", "val_bpb"}). On resume the records past the checkpoint are
dropped, so the file always reads like one uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def measure_matmul_peak(device: str = "cpu", size: int = 1024, seconds: float = 0.5) -> float:
    """Achievable FLOP/s of a square matmul on this device (fp32 on CPU, bf16 on CUDA): the MFU denominator."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):  # warm-up: thread pools, caches
        a @ b
    sync()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def text_bytes(tokenizer, ids) -> int:
    """UTF-8 bytes of the text that the ids stand for; special tokens (BOS) stand for none."""
    specials = set(tokenizer.special_tokens.values())
    return len(tokenizer.decode([int(i) for i in ids if int(i) not in specials]).encode("utf-8"))


def bits_per_byte(loss_nats_sum: float, n_bytes: int) -> float:
    return loss_nats_sum / (math.log(2) * max(n_bytes, 1))


def last_logged(metrics_dir: Path) -> dict:
    """The last per-step record (one with a loss) of metrics_dir/metrics.jsonl; {} when there is none."""
    path = Path(metrics_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return next((r for r in reversed(records) if "loss" in r), {})


class MetricsLogger:
    """Writes records to metrics.jsonl and TensorBoard (rank 0 only) and prints the console line."""

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if self.path.exists():
            self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter  # pulls in tensorboard: only rank 0 writes

            # purge_step hides events a killed run wrote past the checkpoint we resume from.
            self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step or None)
        except ImportError:  # pragma: no cover - tensorboard is a dependency
            log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        tmp.replace(self.path)

    def log(self, record: dict, console: str | None = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"train/{key}" if not key.startswith("val_") else f"val/{key[4:]}", value, step)
        if console:
            log.info(console)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
