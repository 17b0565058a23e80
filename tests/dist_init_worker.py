"""Run under torchrun by test_parallel_init.py: one rank of a parallel layout, on gloo.

    init LAYOUT OUT    build on meta, parallelise, materialise; save every parameter gathered
                       (full_tensor) plus this rank's local element count
    mp REDUCE OUT      dp_shard=2 with bfloat16 compute and REDUCE ("float32" or "bfloat16")
                       gradient reduction: one backward, then the dtypes seen and the gradients
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from zagreus.model.config import ModelConfig
from zagreus.model.llama import materialize, meta_model
from zagreus.train.parallel import ParallelDims, build_mesh, parallelize


def config(tie: bool) -> ModelConfig:
    return ModelConfig(vocab_size=512, hidden_size=64, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=128,
                       max_seq_len=64, init_std=0.02, tie_embeddings=tie)


def main() -> None:
    mode, arg, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(1234 + rank)  # a different global RNG per rank: init must not depend on it
    if mode == "init":
        dims = ParallelDims(**{k: int(v) for k, v in (kv.split("=") for kv in arg.split(","))})
        model = meta_model(config(tie=dims.pp == 1))
        parallelize(model, dims, build_mesh(dims, "cpu"), torch.device("cpu"), activation_checkpointing=dims.pp > 1,
                    local_batch=8)
        materialize(model, "cpu", seed=5)
        gathered = {n.replace("._checkpoint_wrapped_module", ""): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                    for n, p in model.named_parameters(remove_duplicate=False)}
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
        tied = model.embed_tokens is not None and model.lm_head is not None \
            and model.lm_head.weight is model.embed_tokens.weight
        torch.save({"params": gathered, "local": local, "tied": tied}, f"{out}/rank{rank}.pt")
    else:
        dims = ParallelDims(dp_shard=2)
        model = meta_model(config(tie=False))
        parallelize(model, dims, build_mesh(dims, "cpu"), torch.device("cpu"), param_dtype=torch.bfloat16,
                    reduce_dtype=getattr(torch, arg))
        materialize(model, "cpu", seed=5)
        seen = {}
        proj = model.layers["0"].self_attn.q_proj
        proj.register_forward_hook(lambda m, i, o: seen.update(compute_weight=str(m.weight.dtype), output=str(o.dtype)))
        tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(rank))
        model(tokens).float().logsumexp(-1).mean().backward()
        grads = {n: p.grad.to_local().detach().clone() for n, p in model.named_parameters()}
        seen.update(param=str(proj.weight.dtype), grad=str(proj.weight.grad.dtype))
        torch.save({"seen": seen, "grads": grads}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
