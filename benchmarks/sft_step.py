"""Our SFT training step against TRL's SFTTrainer, side by side in one run, CPU fp32.

What it measures: training throughput (tokens/s) and peak resident memory (peak RSS) of one
supervised fine-tuning step, ours (the helpers of zagreus.post.sft, the loop of SFTTask.step
written out inline) and TRL's `SFTTrainer.train()`, on the same model weights, the same
conversations, packing on both sides and the loss on assistant tokens only.

How:
- The parent builds everything both sides read, in a work folder: deterministic synthetic
  multi-turn chats (--convs, --seed), a byte-level BPE tokenizer trained on them
  (zagreus.tokenizer.train_bpe, --vocab; or --tokenizer llama3), a Llama built by zagreus
  (hidden --hidden, --layers, ...; seed 0) saved as a Hugging Face folder with `save_hf`. The
  folder's chat template is the ChatML of zagreus.post.chat with `{% generation %}` markers
  around the assistant content and its `<|im_end|>` (what TRL's assistant_only_loss needs;
  the newline after `<|im_end|>` stays outside, as in our mask). The parent checks that this
  template renders the same text as zagreus' own ChatML Jinja template and, through transformers'
  apply_chat_template, the same token ids and assistant mask as zagreus.post.chat.render.
- Each side then runs in its own subprocess (one after the other), so the peak RSS
  (VmHWM of that child, from /proc) is that side's own: imports, data preparation, model,
  optimizer and the training steps. Both use torch.set_num_threads(--threads), fp32, CPU.
- ours: render(..., "chatml") -> to_sequence -> build_rows(packing=True) (next-fit in a seeded
  shuffled order) -> packed_batch (block-diagonal causal mask, per-conversation positions) ->
  token_losses(reduction="sum") / trained tokens -> backward -> clip 1.0 -> our fused AdamW.
- trl: SFTTrainer on a `messages` dataset, SFTConfig(packing=True (strategy "bfd", which turns
  on padding_free: the batch's rows are flattened into one [1, sum of lengths] sequence and
  transformers' SDPA attention is given a block-diagonal mask found from position_ids),
  assistant_only_loss=True, max_length=--seq-len, per_device_train_batch_size=--batch,
  optim adamw_torch, constant lr, weight decay 0, clip 1.0, bf16/fp16 off, use_cpu, no logging,
  no saving, dataloader_num_workers 0), gradient checkpointing off as ours: the headline peer,
  "trl". --trl-variants adds other TRL runs, each in its own child too: "trl-accum" (1 row per
  micro-batch, --batch micro-batches accumulated per step: the flattened sequence is one row long,
  so attention is not computed over the whole batch) and "trl-gc" (gradient checkpointing on,
  TRL's SFTConfig default). With trl-accum, ours runs the same layout too ("ours-accum": one row
  per micro-batch, --batch accumulated), and the two are compared.
- Same AdamW settings on both sides (lr --lr, betas 0.9/0.999, eps 1e-8, weight decay 0); each
  side its own optimizer build: ours `zagreus.train.optim.build_optimizer` (torch's fused AdamW,
  as `zagreus sft` runs it), TRL's `adamw_torch` (torch's foreach AdamW). --batch rows per optimizer step on both sides.
- Timing: --warmup steps are excluded, then --steps steps are timed from the end of the last
  warm-up step to the end of the last step (data collation, forward, backward, clipping and the
  optimizer step included; TRL's per-step metrics such as entropy and token accuracy too, as it
  always computes them). tokens/s = real tokens (the packed rows' conversation tokens, padding
  excluded; both sides count the same thing) of the timed steps / their seconds. Trained
  (assistant target) tokens are counted too, per step and in total.
- Sanity: the first-step loss of each side (both at the same initial weights; different
  batches, since the two packers lay out rows differently, so close but not equal).

    .venv/bin/python benchmarks/sft_step.py                       # defaults: 1 thread, 2+10 steps
    .venv/bin/python benchmarks/sft_step.py --threads 2 --steps 20 --seq-len 1024 --batch 4
    .venv/bin/python benchmarks/sft_step.py --trl-variants trl,trl-accum,trl-gc

Needs trl (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ChatML as zagreus.post.chat renders it (no tools), with TRL's generation markers around what our
# assistant_mask trains: the assistant content and its <|im_end|>, not the newline after it.
TRAIN_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


VARIANTS = ("trl", "trl-accum", "trl-gc")


def rss_mib() -> float:
    """This process's peak resident memory so far, in MiB: VmHWM, which starts afresh at exec. (On
    Linux ru_maxrss keeps the parent's peak across fork and exec, which would credit both sides
    with the parent's memory.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- data -----------------------------------------------------------------------------------
def synthetic_chats(n: int, seed: int) -> list[list[dict]]:
    """Deterministic multi-turn chats over a made-up lexicon (Zipf-like word frequencies)."""
    rng = random.Random(seed)
    syll = ["ka", "to", "ri", "men", "sa", "lo", "vi", "ne", "da", "pu", "ger", "zo", "bi", "tal", "os", "qu",
            "e", "an", "ur", "il", "mar", "sto", "fe", "gno", "tra", "lu", "che", "pri"]
    lexicon = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(4000)})
    rng.shuffle(lexicon)
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]

    def sentence() -> str:
        words = rng.choices(lexicon, weights, k=rng.randint(4, 16))
        return words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice([".", ".", "?", "!"])

    def text(lo: int, hi: int) -> str:
        return " ".join(sentence() for _ in range(rng.randint(lo, hi)))

    chats = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": text(1, 2)})
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": text(1, 3)})
            msgs.append({"role": "assistant", "content": text(1, 5)})
        chats.append(msgs)
    return chats


def prepare(args, work: Path) -> dict:
    """Chats, tokenizer, model folder; checks the TRL template against ours. Returns facts to print."""
    import torch
    from transformers import AutoTokenizer

    from zagreus.model.config import resolve_model_config
    from zagreus.model.hf import save_hf
    from zagreus.model.llama import build_model
    from zagreus.post.chat import jinja_template, render
    from zagreus.tokenizer import load_tokenizer, train_bpe

    chats = synthetic_chats(args.convs, args.seed)
    (work / "chats.json").write_text(json.dumps(chats))
    if args.tokenizer == "bpe":
        tok = train_bpe((m["content"] for c in chats for m in c), args.vocab, work / "bpe")
        tok_desc = f"byte-level BPE trained on the synthetic chats (asked {args.vocab}, got {tok.vocab_size} tokens)"
    else:
        tok = load_tokenizer("llama3")
        tok_desc = f"Llama-3 ({tok.vocab_size} tokens)"
    cfg = resolve_model_config("small", vocab_size=tok.vocab_size, hidden_size=args.hidden, n_layers=args.layers,
                               n_heads=args.heads, n_kv_heads=args.kv_heads, intermediate_size=args.mlp,
                               max_seq_len=max(1024, args.seq_len), bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = build_model(cfg, seed=0)
    folder = work / "model"
    save_hf(model, tok, folder, chat_template=TRAIN_TEMPLATE)
    n_params = sum(p.numel() for p in model.parameters())
    del model

    # The template TRL trains with must be ours: same text as our Jinja ChatML, same ids and mask as render.
    hf_tok = AutoTokenizer.from_pretrained(folder)
    ours_jinja = jinja_template("chatml")
    same_text = same_ids = same_mask = 0
    lengths, trained = [], []
    for c in chats:
        r = render(c, tok, "chatml")
        lengths.append(len(r.ids))
        trained.append(sum(r.assistant_mask[1:]))
    check = chats[: args.check]
    for c in check:
        r = render(c, tok, "chatml")
        t1 = hf_tok.apply_chat_template(c, tokenize=False, chat_template=TRAIN_TEMPLATE)
        t2 = hf_tok.apply_chat_template(c, tokenize=False, chat_template=ours_jinja)
        same_text += t1 == t2
        out = hf_tok.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                         chat_template=TRAIN_TEMPLATE)
        same_ids += list(out["input_ids"]) == r.ids
        same_mask += [bool(x) for x in out["assistant_masks"]] == list(r.assistant_mask)
    torch.set_num_threads(1)
    return {"tokenizer": tok_desc, "params": n_params, "convs": len(chats),
            "conv_tokens_mean": sum(lengths) / len(lengths), "conv_tokens_max": max(lengths),
            "trained_frac": sum(trained) / sum(lengths),
            "check": f"{len(check)} conversations: same text as zagreus' ChatML jinja {same_text}/{len(check)}, "
                     f"same ids as render {same_ids}/{len(check)}, same assistant mask {same_mask}/{len(check)}"}


# --- the two sides (each in its own process) -------------------------------------------------
def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def run_ours(args, work: Path, accumulate: bool = False) -> dict:
    """Our step; accumulate: one row per micro-batch, --batch of them accumulated (as trl-accum)."""
    import torch

    _threads(args.threads)
    from zagreus.model.hf import load_hf
    from zagreus.post.chat import render
    from zagreus.post.common import IGNORE, pad_id, to_sequence
    from zagreus.post.sft import build_rows, packed_batch, token_losses
    from zagreus.tokenizer import Tokenizer

    rss_imports = rss_mib()
    chats = json.loads((work / "chats.json").read_text())
    tok = Tokenizer.from_tokenizer_json(work / "model" / "tokenizer.json")
    seqs = []
    for c in chats:
        r = render(c, tok, "chatml")
        seq, _ = to_sequence(r.ids, r.assistant_mask, args.seq_len)
        if any(label != IGNORE for label in seq.labels):
            seqs.append(seq)
    rows = [[seqs[i] for i in row] for row in build_rows([len(s) for s in seqs], args.seq_len, packing=True, seed=0)]
    pad = pad_id(tok)
    device = torch.device("cpu")
    model = load_hf(work / "model", device=device)
    model.train()
    # Our stage's optimizer (zagreus.train.optim: torch's fused AdamW kernel where available), with
    # the peer's settings.
    from zagreus.recipe import OptimizerSection
    from zagreus.train.optim import build_optimizer

    opt = build_optimizer(model, OptimizerSection(lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0))
    rss_setup = rss_mib()
    n_steps = args.warmup + args.steps
    if len(rows) < n_steps * args.batch:
        raise SystemExit(f"ours: {len(rows)} packed rows, need {n_steps * args.batch}; raise --convs")

    ends, real, trained, losses = [], [], [], []
    start = time.perf_counter()
    for step in range(n_steps):
        picked = rows[step * args.batch : (step + 1) * args.batch]
        # As SFTTask.step with micro_batch = batch, grad_accum = 1 (one micro-batch per step), or
        # micro_batch = 1, grad_accum = batch.
        micro = [packed_batch([row], pad, device) for row in picked] if accumulate else [packed_batch(picked, pad, device)]
        n_trained = sum(b.trained_tokens for b in micro)
        total = 0.0
        for batch in micro:
            loss_sum = token_losses(model, batch, args.chunk, reduction="sum")
            (loss_sum / n_trained).backward()
            total += float(loss_sum.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / n_trained)
        ends.append(time.perf_counter())
        real.append(sum(len(s) for row in picked for s in row))
        trained.append(n_trained)
    return _result("ours-accum" if accumulate else "ours", args, start, ends, real, trained, losses, rss_imports, rss_setup,
                   {"rows": len(rows), "padded_tokens_per_step": batch.tokens.numel(),
                    "threads": torch.get_num_threads()})


def run_trl(args, work: Path, variant: str) -> dict:
    import torch

    _threads(args.threads)
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rss_imports = rss_mib()
    chats = json.loads((work / "chats.json").read_text())
    dataset = Dataset.from_list([{"messages": c} for c in chats])
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    n_steps = args.warmup + args.steps
    accum = args.batch if variant == "trl-accum" else 1
    gc = variant == "trl-gc"
    config = SFTConfig(
        output_dir=str(work / "trl_out"), max_steps=n_steps, per_device_train_batch_size=args.batch // accum,
        gradient_accumulation_steps=accum, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        optim="adamw_torch", packing=True, packing_strategy="bfd", assistant_only_loss=True, max_length=args.seq_len,
        gradient_checkpointing=gc, bf16=False, fp16=False, use_cpu=True, report_to=[],
        logging_steps=10**6, save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    ends, real, trained, losses = [], [], [], []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, *a, **k):
            ids, labels = inputs["input_ids"], inputs["labels"]
            pad = self.processing_class.pad_token_id
            # padding_free: one flattened sequence, no padding; count as ours does, padding excluded.
            n_pad = int((inputs["attention_mask"] == 0).sum()) if "attention_mask" in inputs else 0
            real.append(ids.numel() - n_pad)
            trained.append(int((labels[:, 1:] != -100).sum()))  # the model shifts labels by one
            loss = super().training_step(model, inputs, *a, **k)
            losses.append(float(loss))
            return loss

    trainer = CountingSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[Timer()])
    n_rows = len(trainer.train_dataset)
    rss_setup = rss_mib()
    if n_rows < n_steps * args.batch:
        raise SystemExit(f"trl: {n_rows} packed rows, need {n_steps * args.batch}; raise --convs")
    start = time.perf_counter()
    trainer.train()
    # training_step runs once per micro-batch: sum each optimizer step's micro-batches (its losses
    # are already scaled by the step's trained tokens, so their sum is the step's mean loss).
    real, trained, losses = ([sum(x[i : i + accum]) for i in range(0, len(x), accum)] for x in (real, trained, losses))
    return _result(variant, args, start, ends, real, trained, losses, rss_imports, rss_setup,
                   {"rows": n_rows, "trl_version": trl.__version__, "padding_free": trainer.padding_free,
                    "attn_implementation": model.config._attn_implementation, "gradient_checkpointing": gc,
                    "micro_batch": args.batch // accum, "grad_accum": accum, "threads": torch.get_num_threads()})


def _result(side, args, start, ends, real, trained, losses, rss_imports, rss_setup, extra) -> dict:
    w = args.warmup
    seconds = ends[-1] - ends[w - 1] if w > 0 else ends[-1] - start
    timed_real, timed_trained = sum(real[w:]), sum(trained[w:])
    return {"side": side, "steps": len(ends), "seconds": seconds, "tokens": timed_real,
            "trained_tokens": timed_trained, "tok_s": timed_real / seconds,
            "tokens_per_step": timed_real / args.steps, "trained_per_step": timed_trained / args.steps,
            "first_loss": losses[0], "last_loss": losses[-1], "rss_after_imports_mib": rss_imports,
            "rss_after_setup_mib": rss_setup, "peak_rss_mib": rss_mib(), **extra}


# --- parent -----------------------------------------------------------------------------------
def child_argv(args, side: str, work: Path) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--side", side, "--work", str(work)]
    for name in ("threads", "steps", "warmup", "seq_len", "batch", "lr", "chunk"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="packed rows per optimizer step (one micro-batch)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--mlp", type=int, default=768)
    ap.add_argument("--tokenizer", choices=["bpe", "llama3"], default="bpe")
    ap.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary asked for")
    ap.add_argument("--convs", type=int, default=800, help="synthetic conversations")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic conversations")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--chunk", type=int, default=1024, help="our loss chunk (tokens; pretrain.loss_chunk's default)")
    ap.add_argument("--check", type=int, default=50, help="conversations checked for template equality")
    ap.add_argument("--trl-variants", default="trl",
                    help="comma list of TRL runs: trl (batch rows per micro-batch, no gradient checkpointing, the "
                         "headline), trl-accum (1 row x batch accumulated), trl-gc (gradient checkpointing on)")
    ap.add_argument("--side", choices=["ours", "ours-accum", *VARIANTS], help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    variants = [v.strip() for v in args.trl_variants.split(",") if v.strip()]
    if "trl" not in variants or set(variants) - set(VARIANTS):
        ap.error(f"--trl-variants: a comma list of {', '.join(VARIANTS)} that includes trl")

    if args.side:
        out = (run_ours(args, args.work, args.side == "ours-accum") if args.side.startswith("ours")
               else run_trl(args, args.work, args.side))
        print("RESULT " + json.dumps(out), flush=True)
        return

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sft_step_") as tmp:
        work = Path(tmp)
        facts = prepare(args, work)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
               "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        results = {}
        # With trl-accum, ours runs the same layout too (ours-accum), so each peer has its twin.
        sides = ["ours", *(["ours-accum"] if "trl-accum" in variants else []), *variants]
        for side in sides:
            proc = subprocess.run(child_argv(args, side, work), env=env, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                raise SystemExit(f"{side} failed (exit {proc.returncode})")
            results[side] = json.loads(lines[-1][len("RESULT "):])
    ours, trl = results["ours"], results["trl"]

    print(f"SFT step, CPU fp32, {args.threads} thread(s); trl {trl['trl_version']}")
    print(f"model: zagreus Llama d={args.hidden}, {args.layers} layers, {args.heads} heads, {args.kv_heads} KV heads, "
          f"MLP {args.mlp}, tied embeddings, {facts['params']:,} parameters; same weights on both sides")
    print(f"tokenizer: {facts['tokenizer']}")
    print(f"data: {facts['convs']} synthetic chats (seed {args.seed}), {facts['conv_tokens_mean']:.0f} tokens mean, "
          f"{facts['conv_tokens_max']} max, {100 * facts['trained_frac']:.1f}% assistant targets; seq_len {args.seq_len}, "
          f"{args.batch} packed rows per step")
    print(f"template check: {facts['check']}")
    print(f"ours: next-fit packing, {ours['rows']} rows, [B, T] batch padded to its longest row "
          f"({ours['padded_tokens_per_step']} slots in the last step), block-diagonal mask")
    for v in variants:
        r = results[v]
        print(f"{v}: bfd packing, {r['rows']} rows, padding_free={r['padding_free']} (a micro-batch's rows flattened "
              f"into one sequence), {r['micro_batch']} row(s) x {r['grad_accum']} accumulated per step, attn "
              f"{r['attn_implementation']}, gradient_checkpointing={r['gradient_checkpointing']}")
    print(f"timed: {args.steps} steps after {args.warmup} warm-up; tokens = real tokens of the packed rows "
          f"(padding excluded), the same count on both sides; threads in use ours {ours['threads']}, trl {trl['threads']}")
    print()
    head = f"{'side':<9} {'tok/s':>9} {'s':>7} {'tokens':>8} {'tok/step':>9} {'trained/step':>12} {'trained':>8} " \
           f"{'loss[0]':>8} {'loss[-1]':>8} {'RSS imp':>8} {'RSS setup':>9} {'peak RSS':>9}"
    print(head)
    for r in results.values():
        print(f"{r['side']:<9} {r['tok_s']:>9.0f} {r['seconds']:>7.2f} {r['tokens']:>8} {r['tokens_per_step']:>9.0f} "
              f"{r['trained_per_step']:>12.0f} {r['trained_tokens']:>8} {r['first_loss']:>8.4f} {r['last_loss']:>8.4f} "
              f"{r['rss_after_imports_mib']:>8.0f} {r['rss_after_setup_mib']:>9.0f} {r['peak_rss_mib']:>9.0f}")
    print("(RSS in MiB: after imports, after data/model/optimizer setup, peak of the whole child process)")
    speed = ours["tok_s"] / trl["tok_s"]
    mem = ours["peak_rss_mib"] / trl["peak_rss_mib"]
    print()
    print(f"ours: {ours['tok_s']:.0f} tok/s, peak RSS {ours['peak_rss_mib']:.0f} MiB; "
          f"trl: {trl['tok_s']:.0f} tok/s, peak RSS {trl['peak_rss_mib']:.0f} MiB; "
          f"ratio tokens/s ours/trl = {speed:.2f} (target >= 1.5, {'met' if speed >= 1.5 else 'NOT met'}); "
          f"ratio RSS ours/trl = {mem:.2f} (target <= 0.6, {'met' if mem <= 0.6 else 'NOT met'})")
    for v in (v for v in variants if v != "trl"):
        r, mine = results[v], results["ours-accum"] if v == "trl-accum" else ours
        print(f"{mine['side']} against {v}: {mine['tok_s']:.0f} vs {r['tok_s']:.0f} tok/s, peak RSS {mine['peak_rss_mib']:.0f} vs "
              f"{r['peak_rss_mib']:.0f} MiB; ratio tokens/s {mine['tok_s'] / r['tok_s']:.2f}, "
              f"ratio RSS {mine['peak_rss_mib'] / r['peak_rss_mib']:.2f}")
    print(f"(whole run {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
