"""The chunked cross-entropy equals the plain loss over full logits, in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from zagreus.recipe import OptimizerSection, ScheduleSection
from zagreus.train.losses import chunked_cross_entropy, token_logprobs
from zagreus.train.optim import build_optimizer, lr_multiplier


def _case(dtype: torch.dtype, std: float = 1.0):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 41, 32, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(257, 32, generator=gen, dtype=dtype) * std).requires_grad_()
    targets = torch.randint(0, 257, (3, 41), generator=gen)
    targets[0, :7] = -100  # ignored positions, as SFT masks prompts
    return hidden, weight, targets


# fp64 checks the algorithm to 1e-10 (well inside 1e-6); fp32 checks it is only rounding apart,
# relative to the largest value (fp32 epsilon is 1.2e-7; sums over chunks reorder additions).
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 5e-6)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_equals_plain(dtype, tol, reduction):
    # fp32 with Llama-scale weights (init std 0.02-0.03) keeps absolute errors comparable to 1e-6.
    hidden, weight, targets = _case(dtype, std=0.05 if dtype == torch.float32 else 1.0)
    plain = F.cross_entropy((hidden @ weight.T).reshape(-1, 257), targets.reshape(-1), reduction=reduction)
    if reduction == "none":
        plain = plain.reshape(targets.shape)
    grad_out = torch.randn_like(plain)
    ref_h, ref_w = torch.autograd.grad((plain * grad_out).sum(), [hidden, weight], retain_graph=True)
    if reduction != "none":  # loss.backward() itself: the gradient of the output is exactly 1
        one_h, one_w = torch.autograd.grad(plain, [hidden, weight])
    for chunk in (1, 16, 50, 10_000):  # 1 row, uneven chunks, a single chunk
        ours = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=chunk, reduction=reduction)
        g_h, g_w = torch.autograd.grad((ours * grad_out).sum(), [hidden, weight])
        assert ours.shape == plain.shape
        pairs = [(ours, plain), (g_h, ref_h), (g_w, ref_w)]
        if reduction != "none":
            ours = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=chunk, reduction=reduction)
            pairs += list(zip(torch.autograd.grad(ours, [hidden, weight]), (one_h, one_w)))
        for got, ref in pairs:
            scale = 1.0 if dtype == torch.float64 else max(1.0, ref.abs().max().item())
            assert (got - ref).abs().max().item() <= tol * scale


def test_token_logprobs_and_no_grad():
    hidden, weight, targets = _case(torch.float64)
    lp = token_logprobs(hidden, weight, targets, chunk_tokens=20)
    ref = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    ref = torch.where(targets == -100, 0.0, ref)
    torch.testing.assert_close(lp, ref, atol=1e-10, rtol=0)
    with torch.no_grad():
        value = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=20)
    assert not value.requires_grad
    torch.testing.assert_close(value, F.cross_entropy((hidden @ weight.T).reshape(-1, 257), targets.reshape(-1)))


def test_weight_decay_groups():
    from zagreus.model.config import resolve_model_config
    from zagreus.model.llama import Transformer

    model = Transformer(resolve_model_config("tiny", n_layers=1))
    opt = build_optimizer(model, OptimizerSection(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert "embed_tokens.weight" not in names and not any("norm" in n for n in names)
    assert "layers.0.mlp.up_proj.weight" in names
    opt = build_optimizer(model, OptimizerSection(weight_decay=0.1, decay_norms_and_embeddings=True))
    assert len(opt.param_groups) == 1


def test_schedules():
    wsd = lr_multiplier(ScheduleSection(kind="wsd", warmup=4, decay=5, min_lr=1e-4), 20, base_lr=1e-2)
    values = [wsd(s) for s in range(20)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4:15] == [1.0] * 11
    assert values[19] == pytest.approx(1e-2)  # reaches the floor min_lr / lr at the last step
    assert values[15] == pytest.approx(1 - 0.2 * (1 - 1e-2))
    cos = lr_multiplier(ScheduleSection(kind="cosine", warmup=2, min_lr=0.0), 12, base_lr=1.0)
    assert cos(1) == 1.0 and cos(6) == pytest.approx(0.5) and cos(11) == pytest.approx(0.0, abs=1e-12)
    const = lr_multiplier(ScheduleSection(kind="constant", warmup=0), 10)
    assert [const(s) for s in range(10)] == [1.0] * 10
