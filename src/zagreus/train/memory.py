"""Per-GPU memory and throughput of a pretraining layout, estimated before any GPU is touched.

`zagreus check RECIPE` prints it: what a rank of `pretrain.parallel` holds (the recipe's layout
resolved by ParallelDims for `--gpus` processes), the activations one micro-batch leaves for
backward, with and without activation checkpointing, and the step time at a stated MFU.

Everything is counted for the largest rank, eagerly, as every term at its largest at once (a
slight over-estimate of the true peak). The CUDA context, NCCL buffers and allocator
fragmentation are not counted; `fits` keeps HEADROOM of the card free for them. torch.compile
(pretrain.compile) usually saves less than eager autograd (Inductor recomputes cheap ops).

What each part holds, following zagreus.train.parallel:
- model states: FSDP2 keeps fp32 parameters, fp32 gradients and AdamW's two fp32 moments sharded
  on dim 0 over dp_shard (tp shards first); 16 bytes per local parameter.
- gathered weights (dp > 1): blocks are all-gathered in param_dtype two at a time (the one
  running and the one prefetched); the root (embedding, final norm, head) stays gathered after
  forward; with pipelining, or plain replication, every block of the stage stays gathered.
- gradient buffers (dp > 1): unsharded param_dtype gradients wait for their reduce-scatter (the
  root's until the end of backward, a pipeline stage's until its last micro-batch) and the
  reduce copies them in reduce_dtype.
- activations: what autograd saves in zagreus.model.llama (counted per op in
  `block_activation_bytes`), checked against measured saved tensors in tests/test_memory_estimate.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zagreus.errors import UserError
from zagreus.model.config import ModelConfig
from zagreus.recipe import PretrainSection
from zagreus.train.loop import grad_accumulation
from zagreus.train.parallel import ParallelDims, pipeline_microbatches, resolve_param_dtype, stage_layers

GB = 1e9
FP32 = 4
INT64 = 8
# Share of a card's memory left free for what is not counted (CUDA context, NCCL buffers, fragmentation).
HEADROOM = 0.10
# `--gpus` default when dp_shard is -1: one node of 8 GPUs (rounded up to a multiple of the fixed degrees).
DEFAULT_NODE_GPUS = 8


@dataclass(frozen=True)
class Gpu:
    name: str
    memory: float      # bytes, as the datasheet states them (decimal GB; the cards hold a little more)
    peak_flops: float  # dense bf16 tensor-core FLOP/s (no sparsity)


# NVIDIA datasheets: A100 312 TFLOP/s bf16 (40 or 80 GB HBM); H100 SXM 989 TFLOP/s (1,979 is with
# sparsity), 80 GB; H200 the same GH100 tensor cores with 141 GB HBM3e.
GPUS = {
    "a100-40gb": Gpu("A100 40GB", 40 * GB, 312e12),
    "a100-80gb": Gpu("A100 80GB", 80 * GB, 312e12),
    "h100": Gpu("H100 SXM 80GB", 80 * GB, 989e12),
    "h200": Gpu("H200 141GB", 141 * GB, 989e12),
}


def gpu(name: str) -> Gpu:
    if name not in GPUS:
        raise UserError(f"--gpu {name}: unknown GPU; choose one of {', '.join(GPUS)}")
    return GPUS[name]


@dataclass(frozen=True)
class Precision:
    """Bytes per element of the weights a forward reads (and of the residual stream), of the matmuls,
    and of the gradient reduction."""

    params: int
    compute: int
    reduce: int = FP32

    @classmethod
    def cuda(cls, dims: ParallelDims, param_dtype: str, reduce_dtype: str) -> "Precision":
        # FSDP2 / replicate (dp > 1) gather the weights in param_dtype ("auto" is bf16 on CUDA); without
        # data parallelism the fp32 weights are used as they are. devices.autocast computes in bf16 on CUDA.
        params = resolve_param_dtype(param_dtype, torch.device("cuda")).itemsize if dims.dp > 1 else FP32
        return cls(params=params, compute=torch.bfloat16.itemsize, reduce=getattr(torch, reduce_dtype).itemsize)


# --- parameters -----------------------------------------------------------------------------
def _local(rows: int, cols: int, dims: ParallelDims, tp_dim: int | None) -> int:
    """Elements of rank 0's shard of a [rows, cols] weight: tp splits `tp_dim`, then FSDP2 dim 0 over
    dp_shard (the first ranks take the ceiling, as torch.chunk does)."""
    if tp_dim == 0:
        rows = math.ceil(rows / dims.tp)
    elif tp_dim == 1:
        cols = math.ceil(cols / dims.tp)
    return math.ceil(rows / dims.dp_shard) * cols


@dataclass(frozen=True)
class StageParams:
    """Local parameter elements of one pipeline stage's largest rank: its blocks and its root."""

    block: int           # one block
    block_matmul: int    # its matrices (what autocast casts)
    blocks: int          # number of blocks of the stage
    root: int            # embedding, final norm, head held by this stage

    @property
    def total(self) -> int:
        return self.block * self.blocks + self.root


def stage_params(cfg: ModelConfig, dims: ParallelDims, stage: int, shard: bool = True) -> StageParams:
    """Parameters of `stage` as apply_tp and FSDP2 split them (shard=False: before FSDP2, as gathered)."""
    dims = dims if shard else ParallelDims(tp=dims.tp, pp=dims.pp)
    d, kv, inter = cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, cfg.intermediate_size
    # q/k/v and gate/up are column-parallel (rows split), o/down row-parallel (columns split); norms replicate.
    matmul = (_local(d, d, dims, 0) + 2 * _local(kv, d, dims, 0) + _local(d, d, dims, 1)
              + 2 * _local(inter, d, dims, 0) + _local(d, inter, dims, 1))
    norm = _local(d, 1, dims, None)
    root = 0
    if stage == 0:
        root += _local(cfg.vocab_size, d, dims, 0)  # the embedding is split on the vocabulary
    if stage == dims.pp - 1:
        root += norm + (0 if cfg.tie_embeddings else _local(cfg.vocab_size, d, dims, 0))
    return StageParams(block=matmul + 2 * norm, block_matmul=matmul,
                       blocks=len(stage_layers(cfg.n_layers, dims.pp)[stage]), root=root)


# --- activations ----------------------------------------------------------------------------
def block_activation_bytes(cfg: ModelConfig, tokens: int, prec: Precision, tp: int = 1) -> int:
    """Bytes one Block saves for backward over `tokens` tokens, without activation checkpointing.

    Op by op (zagreus.model.llama), with r = prec.params (the residual stream's element) and
    c = prec.compute:
    - each RMSNorm: its input in fp32 (x.float() is x itself when r is fp32), the normalised x
      (r, for the weight's gradient) and rsqrt (fp32, one per token); under TP these run on 1/tp
      of the sequence.
    - the inputs of q/k/v and of gate/up, all-gathered under TP: one shared tensor when r == c,
      otherwise autocast casts it once per projection (3 and 2 copies in c).
    - RoPE saves only cos/sin (shared by every layer, counted in `root_activation_bytes`).
    - SDPA's flash kernel (CUDA, and CPU's flash kernel alike): q, k, v (k and v at the KV heads:
      GQA is native, nothing is repeated), the output (also o_proj's input) and the fp32
      log-sum-exp per head and token; no [seq x seq] matrix. CUDA's adds two scalar RNG tensors.
    - SwiGLU: gate (silu's input), silu(gate), up and their product (down_proj's input).
    - with r != c, autocast's bf16 copy of every matrix is what its matmul saves.
    """
    d, kv, inter, heads = cfg.hidden_size, cfg.n_kv_heads * cfg.head_dim, cfg.intermediate_size, cfg.n_heads
    r, c = prec.params, prec.compute
    norms = 2 * math.ceil(tokens / tp) * ((FP32 + r) * d + FP32)
    projection_inputs = tokens * c * d * ((1 if r == c else 3) + (1 if r == c else 2))
    attention = tokens * (c * (2 * d + 2 * kv) + FP32 * heads) // tp
    mlp = tokens * 4 * c * inter // tp
    weight_copies = 0 if r == c else c * stage_params(cfg, ParallelDims(tp=tp), 0).block_matmul
    return norms + projection_inputs + attention + mlp + weight_copies


@dataclass(frozen=True)
class Loss:
    saved: int      # bytes autograd holds from the loss until backward
    transient: int  # extra bytes while it runs


def loss_bytes(cfg: ModelConfig, tokens: int, prec: Precision, *, fused: bool, chunk: int, tp: int = 1,
               loss_parallel: bool = True) -> Loss:
    """The output head and the cross-entropy of the last stage over `tokens` tokens.

    fused (zagreus.train.losses, no TP/PP): the gradients of the hidden states (r) and of the
    output matrix (fp32 [vocab, d], accumulated over chunks) are computed in forward and saved;
    each chunk holds two fp32 [chunk, vocab] buffers (logits, softmax; CPU in fp32 reuses one),
    and a compute-dtype copy of an fp32 head lives while the loss runs. Otherwise
    (parallel.cross_entropy): lm_head saves its (all-gathered) input and, under autocast, its
    bf16 copy of an fp32 head; log_softmax its fp32 output, vocabulary-sharded under
    loss_parallel; nll_loss the int64 targets. The logits and their fp32 copy are transient.
    """
    d, vocab, r, c = cfg.hidden_size, cfg.vocab_size, prec.params, prec.compute
    if fused:
        rows = min(chunk, tokens)
        logits = rows * vocab * (FP32 if c == FP32 else 2 * FP32)
        head_copy = 0 if r == c else c * vocab * d
        return Loss(saved=tokens * d * r + FP32 * vocab * d, transient=logits + head_copy)
    local_vocab = math.ceil(vocab / tp) if loss_parallel else vocab
    head_copy = 0 if r == c else c * math.ceil(vocab / tp) * d
    return Loss(saved=tokens * c * d + head_copy + tokens * (local_vocab * FP32 + INT64),
                transient=tokens * local_vocab * (c + (0 if c == FP32 else FP32)))


def root_activation_bytes(cfg: ModelConfig, seqs: int, seq_len: int, prec: Precision, *, first: bool, last: bool,
                          fused_loss: bool, loss_chunk: int, tp: int = 1, loss_parallel: bool = True) -> tuple[int, int]:
    """(saved, transient) bytes outside the blocks: the embedding's token ids, RoPE's cos and sin
    (in the residual dtype, one pair that every layer shares), the final norm and the loss."""
    tokens = seqs * seq_len
    saved = 2 * tokens * cfg.head_dim * prec.params
    transient = 0
    if first:
        saved += tokens * INT64
    if last:
        saved += math.ceil(tokens / tp) * ((FP32 + prec.params) * cfg.hidden_size + FP32)
        loss = loss_bytes(cfg, tokens, prec, fused=fused_loss, chunk=loss_chunk, tp=tp, loss_parallel=loss_parallel)
        saved, transient = saved + loss.saved, loss.transient
    return saved, transient


@dataclass(frozen=True)
class Activations:
    saved: int          # held from the end of forward into backward
    loss: int = 0       # the loss's buffers while it runs
    recompute: int = 0  # with AC: one block's activations, rebuilt in its backward

    @property
    def peak(self) -> int:
        return self.saved + max(self.loss, self.recompute)


def activation_bytes(cfg: ModelConfig, seqs: int, seq_len: int, prec: Precision, *, layers: int, ac: bool,
                     first: bool = True, last: bool = True, fused_loss: bool = True, loss_chunk: int = 1024,
                     tp: int = 1, loss_parallel: bool = True) -> Activations:
    """One micro-batch of `seqs` x `seq_len` through `layers` blocks (a stage of them).

    With activation checkpointing (parallel.apply_ac) a block saves only its input (the residual
    stream, sequence-sharded under TP) and recomputes its activations in its backward.
    """
    tokens = seqs * seq_len
    block = block_activation_bytes(cfg, tokens, prec, tp)
    saved, transient = root_activation_bytes(cfg, seqs, seq_len, prec, first=first, last=last, fused_loss=fused_loss,
                                             loss_chunk=loss_chunk, tp=tp, loss_parallel=loss_parallel)
    if ac:
        return Activations(saved + layers * math.ceil(tokens / tp) * cfg.hidden_size * prec.params, transient, block)
    return Activations(saved + layers * block, transient)


def _reshards_blocks(dims: ParallelDims) -> bool:
    """apply_data_parallel frees a block's gathered weights after its forward only under FSDP2
    (dp_shard > 1) without pipelining; replicate and pipeline stages keep them."""
    return dims.dp_shard > 1 and dims.pp == 1


def fused_loss(dims: ParallelDims) -> bool:
    """Whether the head is fused into the chunked loss: ParallelModel does it without TP and PP only."""
    return dims.tp == 1 and dims.pp == 1


# --- the estimate of a layout ---------------------------------------------------------------
@dataclass(frozen=True)
class StageMemory:
    """Bytes on the largest rank of one pipeline stage."""

    stage: int
    params: StageParams        # local (sharded) elements
    states: int                # fp32 parameters + gradients + AdamW moments
    gathered: int              # param_dtype weights all-gathered by FSDP2
    grad_buffers: int          # unsharded gradients waiting for, and copied by, the reduce
    activations: Activations   # as the recipe runs (its activation_checkpointing)
    other_ac: Activations      # with activation checkpointing switched the other way

    @property
    def peak(self) -> int:
        return self.states + self.gathered + self.grad_buffers + self.activations.peak

    @property
    def peak_other_ac(self) -> int:
        return self.peak - self.activations.peak + self.other_ac.peak


def stage_memory(cfg: ModelConfig, p: PretrainSection, dims: ParallelDims, stage: int, prec: Precision,
                 pipeline_seqs: int, in_flight: int) -> StageMemory:
    local = stage_params(cfg, dims, stage)
    whole = stage_params(cfg, dims, stage, shard=False)  # FSDP2's unsharded view (TP-local)
    gathered = grad_buffers = 0
    if dims.dp > 1:
        two = min(2, whole.blocks)
        gathered_blocks = two if _reshards_blocks(dims) else whole.blocks
        # A pipeline stage reduces its gradients after its last micro-batch; otherwise each block's
        # are reduced right after its backward, the next block's already being computed.
        pending_blocks = whole.blocks if dims.pp > 1 else two
        gathered = prec.params * (whole.root + gathered_blocks * whole.block)
        grad_buffers = prec.params * (whole.root + pending_blocks * whole.block) + prec.reduce * two * whole.block
    first, last = stage == 0, stage == dims.pp - 1
    fused = fused_loss(dims)

    def acts(ac: bool) -> Activations:
        one = activation_bytes(cfg, pipeline_seqs, p.seq_len, prec, layers=whole.blocks, ac=ac, first=first, last=last,
                               fused_loss=fused, loss_chunk=p.loss_chunk, tp=dims.tp,
                               loss_parallel=p.parallel.loss_parallel)
        return Activations(one.saved * in_flight, one.loss, one.recompute)

    return StageMemory(stage, local, 4 * FP32 * local.total, gathered, grad_buffers,
                       acts(p.activation_checkpointing), acts(not p.activation_checkpointing))


@dataclass(frozen=True)
class Estimate:
    cfg: ModelConfig
    p: PretrainSection
    dims: ParallelDims
    gpus_assumed: bool
    gpu: Gpu
    mfu: float
    prec: Precision
    accum: int
    worst: StageMemory

    @property
    def tokens_per_step(self) -> int:
        return self.p.seq_len * self.p.micro_batch * self.dims.dp * self.accum

    @property
    def step_seconds(self) -> float:
        flops = self.cfg.flops_per_token(self.p.seq_len) * self.tokens_per_step
        return flops / (self.dims.world_size * self.gpu.peak_flops * self.mfu)

    @property
    def fits(self) -> bool:
        return self.worst.peak <= (1 - HEADROOM) * self.gpu.memory


def default_gpus(p: PretrainSection) -> int:
    """The layout's own world size, or (dp_shard -1) one 8-GPU node rounded up to the fixed degrees."""
    par = p.parallel
    fixed = par.dp_replicate * par.tp * par.pp
    if par.dp_shard != -1:
        return fixed * par.dp_shard
    return fixed * math.ceil(DEFAULT_NODE_GPUS / fixed)


def estimate(cfg: ModelConfig, p: PretrainSection, gpus: int | None, gpu_name: str, mfu: float) -> Estimate:
    """The recipe's layout on `gpus` (None: default_gpus) GPUs of kind `gpu_name`, at `mfu` of their peak;
    a layout that pretraining would refuse is refused here with the same UserError."""
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu}: give a fraction of the peak, in (0, 1]")
    card = gpu(gpu_name)
    par = p.parallel
    world = gpus or default_gpus(p)
    dims = ParallelDims.resolve(par.dp_replicate, par.dp_shard, par.tp, par.pp, world_size=world)
    dims.check_model(cfg, p.seq_len)
    dims.check_features(p.activation_checkpointing, p.compile)
    accum = grad_accumulation(p, dims.dp)
    prec = Precision.cuda(dims, par.param_dtype, par.reduce_dtype)
    stages = []
    for stage in range(dims.pp):
        if dims.pp == 1:
            seqs, in_flight = p.micro_batch, 1
        else:
            # The schedule cuts a rank's micro_batch x accum sequences into n micro-batches; under 1F1B
            # stage s holds pp - s of them between their forward and backward, GPipe all n.
            n = pipeline_microbatches(par.pp_microbatches, dims.pp, p.micro_batch * accum)
            seqs = p.micro_batch * accum // n
            in_flight = n if par.pp_schedule == "gpipe" else min(dims.pp - stage, n)
        stages.append(stage_memory(cfg, p, dims, stage, prec, seqs, in_flight))
    return Estimate(cfg, p, dims, gpus is None, card, mfu, prec, accum, max(stages, key=lambda s: s.peak))


# --- the lines `zagreus check` prints -------------------------------------------------------
def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.3g} s" if seconds >= 0.1 else f"{seconds * 1e3:.3g} ms"


def _dtype(nbytes: int) -> str:
    return {2: "bf16", 4: "fp32"}[nbytes]


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "es" if noun.endswith("h") else "s")


def report(e: Estimate) -> list[str]:
    """The estimate as `zagreus check` prints it, ending in the `fits in N GB: yes|no` verdict and the step time."""
    dims, p, par, w, prec = e.dims, e.p, e.p.parallel, e.worst, e.prec
    card = f"{e.gpu.memory / GB:.0f} GB"
    setting, switched = ("with", "without") if p.activation_checkpointing else ("without", "with")
    if dims.dp > 1:
        precision = (f"bf16 compute on CUDA, weights gathered in {_dtype(prec.params)} (param_dtype {par.param_dtype}), "
                     f"gradients reduced in {par.reduce_dtype}")
    else:
        precision = "bf16 autocast on CUDA over the fp32 weights (no data parallelism, so no FSDP2 param_dtype)"
    stage = f" (pipeline stage {w.stage})" if dims.pp > 1 else ""
    lines = [
        f"  layout        : {'--gpus not given: assumed ' if e.gpus_assumed else ''}{_count(dims.world_size, 'GPU')} = "
        f"dp_replicate {dims.dp_replicate} x dp_shard {dims.dp_shard} x tp {dims.tp} x pp {dims.pp}; "
        f"{_count(e.accum, 'micro-batch')} of {p.micro_batch} x {p.seq_len} per rank and step",
        f"  precision     : {precision}",
        f"  memory per GPU: {e.gpu.name}, the largest rank{stage}, eager autograd (torch.compile usually saves less)",
        f"    parameters  : {_gb(FP32 * w.params.total)} fp32, {w.params.total:,} of {e.cfg.param_counts()['total']:,}",
        f"    gradients   : {_gb(FP32 * w.params.total)} fp32",
        f"    optimizer   : {_gb(2 * FP32 * w.params.total)} AdamW exp_avg and exp_avg_sq, fp32",
    ]
    if dims.dp > 1:
        held = "2 blocks" if _reshards_blocks(dims) else "every block of the stage"
        lines += [f"    gathered    : {_gb(w.gathered)} {_dtype(prec.params)} weights of the root modules the rank holds "
                  f"(embedding, final norm, head) and {held}",
                  f"    grad buffers: {_gb(w.grad_buffers)} unsharded gradients waiting for the reduce, and its copies"]
    chunk = f", {p.loss_chunk:,} tokens a chunk" if fused_loss(dims) else ""
    lines += [
        f"    activations : {_gb(w.activations.saved)} saved {setting} activation checkpointing (the recipe's setting), "
        f"{_gb(w.other_ac.saved)} {switched}",
        f"    loss        : {_gb(w.activations.loss)} while the loss runs (logits over the {e.cfg.vocab_size:,}-entry vocabulary{chunk})",
    ]
    if p.activation_checkpointing:
        lines.append(f"    recompute   : {_gb(w.activations.recompute)} one block's activations, rebuilt in its backward")
    lines.append(f"    peak        : {_gb(w.peak)} ({switched} activation checkpointing: {_gb(w.peak_other_ac)})")
    lines.append(f"  fits in {card}: {'yes' if e.fits else 'no'} (estimated peak {w.peak / GB:.1f} GB; {HEADROOM:.0%} of "
                 f"the card kept free for the CUDA context, NCCL buffers and fragmentation, which are not counted)")
    if not e.fits and not p.activation_checkpointing and w.peak_other_ac <= (1 - HEADROOM) * e.gpu.memory:
        lines.append(f"    it would fit with pretrain.activation_checkpointing: true (peak {w.peak_other_ac / GB:.1f} GB)")
    flops = e.cfg.flops_per_token(p.seq_len)
    lines.append(f"  throughput    : at {e.mfu:.0%} MFU of {e.gpu.peak_flops / 1e12:.0f} TFLOP/s per GPU: "
                 f"{_duration(e.step_seconds)} per step of {e.tokens_per_step:,} tokens ({flops / 1e9:.3g} GFLOP/token), "
                 f"{e.gpu.peak_flops * e.mfu / flops:,.0f} tokens/s per GPU, "
                 f"{_duration(p.steps * e.step_seconds)} for {p.steps:,} steps")
    return lines
