"""Generation tasks: the `zagreus` model's generate_until (batched, with the KV cache) against
lm-eval's own `hf` model on the same export, string for string, and through a whole
ifeval-like generate_until task run.

The export is a 2-layer d=64 random model (init_std 0.2, so the argmax margins are wide and
greedy decoding has no near-ties to flip) on a small BPE trained on the prompts. Its replies
are gibberish, which suits the comparison: they hit special tokens (which HFLM's decode drops),
invalid UTF-8 byte tokens, the stop strings drawn from them, and the max_gen_toks budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_GEN = 32
# IFEval-style prompts of many lengths; the last is longer than max_length - max_gen_toks, so it is left-truncated.
PROMPTS = [
    "Hi",
    "Write a haiku about the sea. Do not use any commas.",
    "What is the capital of France? Your entire response should be in English, and in all lowercase letters.",
    "Write a short poem about a lonely lighthouse keeper. Give it a title wrapped in double angular brackets, "
    "such as <<poem of joy>>.",
    "List three benefits of drinking water. Your answer must contain exactly 3 bullet points in markdown format.",
    "Rewrite the following sentence in a more formal tone: hey guys, the meeting is moved to 3pm, dont be late. "
    "Answer with less than 40 words.",
    "Write a story about a robot that learns to paint. End your response with the exact phrase "
    "'Is there anything else I can help with?'. No other words should follow this phrase.",
    "Give me a recipe for pancakes. Wrap your entire response with double quotation marks.",
    "Explain quantum computing to a five year old. Highlight at least 2 sections in your answer with markdown, "
    "i.e. *highlighted section*.",
    "Write a cover letter for a job at a bakery. Include the keywords flour, oven and smile. "
    "Your response should contain 2 paragraphs separated by the markdown divider: ***",
    "Translate 'good morning, how are you today?' into Italian, Spanish and French. "
    "Entire output should be wrapped in JSON format.",
    "Write an essay about the history of the printing press in Europe, from Gutenberg to the industrial age, "
    "for a high school audience. Your response should contain at least 5 paragraphs. " * 8,
]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from test_eval_lm import build_export

    from zagreus.tokenizer import train_bpe

    tok_dir = tmp_path_factory.mktemp("tok")
    train_bpe(PROMPTS * 3, 768, tok_dir)
    return build_export(tmp_path_factory.mktemp("export"), tok_dir)


@pytest.fixture(scope="module", params=[1, 4], ids=["batch1", "batch4"])
def lms(request, export):
    from lm_eval.models.huggingface import HFLM

    from zagreus.eval.lm import make_lm

    bs = request.param
    return make_lm(export, batch_size=bs), HFLM(pretrained=str(export), batch_size=bs, device="cpu")


def _requests(groups: list[dict]):
    """One request per prompt and gen_kwargs group, as a task hands them over."""
    from lm_eval.api.instance import Instance

    return [Instance("generate_until", {}, (p, json.loads(json.dumps(kw))), i)
            for i, (p, kw) in enumerate((p, kw) for kw in groups for p in PROMPTS)]


def _free(lm) -> list[str]:
    return lm.generate_until(_requests([{"until": [], "max_gen_toks": MAX_GEN, "do_sample": False}]), True)


def test_generate_until_equals_hflm(lms):
    ours_lm, hf_lm = lms
    # The long prompt is cut from the left to max_length - max_gen_toks tokens, on both sides.
    assert len(ours_lm.tok_encode(PROMPTS[-1])) > ours_lm.max_length - MAX_GEN
    free = _free(ours_lm)
    assert free == _free(hf_lm)
    # Stop strings that the replies really contain, at different places: two characters from
    # the middle of three replies (none with a replacement character: a stop string is text).
    stops = [s for s in (r[k:k + 2] for r, k in zip(free[1::3], (6, 9, 12, 15))) if len(s) == 2 and "\ufffd" not in s]
    assert len(stops) >= 3
    groups = [
        {"until": stops, "max_gen_toks": MAX_GEN, "do_sample": False},
        {"until": [stops[0]], "max_gen_toks": MAX_GEN // 2, "do_sample": False, "temperature": 0.0},
        {"until": "\n\n", "do_sample": False, "max_gen_toks": 5},  # a string, not a list, as some tasks write it
    ]
    ours = ours_lm.generate_until(_requests(groups), True)
    ref = hf_lm.generate_until(_requests(groups), True)
    assert len(ours) == len(ref) == 3 * len(PROMPTS)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a == b, (i, a, b)
    # The stops did cut: some replies end early, each before its stop, and prefix their free reply.
    n = len(PROMPTS)
    cut = [i for i in range(n) if len(ours[i]) < len(free[i])]
    assert len(cut) >= 3
    for i in range(n):
        assert free[i].startswith(ours[i]) and not any(s in ours[i] for s in stops)


def test_rows_stop_early_and_specials_add_no_text(export, monkeypatch):
    """A row leaves the batch at its stop string (no steps past it), and special tokens the model
    emits decode to nothing, as in HFLM's decode (skip_special_tokens)."""
    from zagreus.eval import lm as lm_mod
    from zagreus.model.generate import Decoder, SamplingParams

    ours = lm_mod.make_lm(export, batch_size=4)
    prompts = [ours.tok_encode(p) for p in PROMPTS[:-1]]
    params = SamplingParams(max_new_tokens=MAX_GEN, stop_ids=ours.stop_ids)
    fed = []
    step = Decoder.step
    monkeypatch.setattr(Decoder, "step", lambda self, tokens: fed.append(len(tokens)) or step(self, tokens))
    specials = ours.zt.special_tokens.values()
    free = lm_mod.generate_batch(ours.model, prompts, params, [], ours.zt.decode, hidden_ids=specials)
    free_steps, fed[:] = sum(fed), []
    assert free_steps >= (len(prompts) - 2) * (MAX_GEN - 1)  # no stop string: rows run their budget (or to EOS)
    raw = lm_mod.generate_batch(ours.model, prompts, params, [], ours.zt.decode)
    assert raw != free and any("<|" in t for t in raw)  # special tokens were generated and hidden
    stop = free[0][4:6]
    fed.clear()
    texts = lm_mod.generate_batch(ours.model, prompts, params, [stop], ours.zt.decode, hidden_ids=specials)
    # Row 0 stopped at its stop string: its text ends right after it, the batch stepped less.
    assert texts[0].endswith(stop) or texts[0][:-1].endswith(stop) or stop in texts[0][-8:]
    assert free[0].startswith(texts[0]) and len(texts[0]) < len(free[0])
    assert sum(fed) < free_steps


def write_ifeval_like_task(folder: Path, max_gen_toks: int = MAX_GEN) -> Path:
    """A local task shaped like lm-eval's ifeval (records key, prompt, instruction_id_list, kwargs;
    generate_until with until []; the four accuracies) over PROMPTS, with a few instruction checks
    of its own: lm-eval's need langdetect and nltk's punkt data, which this machine lacks."""
    folder.mkdir(parents=True, exist_ok=True)
    checks = [("punctuation:no_comma", {}), ("length_constraints:number_words", {"relation": "less than", "num_words": 20}),
              ("change_case:english_lowercase", {}), ("startend:end_checker", {"end_phrase": "help with?"})]
    rows = [{"key": 1000 + i, "prompt": p, "instruction_id_list": [checks[i % 4][0], checks[(i + 1) % 4][0]],
             "kwargs": [checks[i % 4][1], checks[(i + 1) % 4][1]]} for i, p in enumerate(PROMPTS)]
    (folder / "ifeval_like.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "utils.py").write_text('''
def _follows(instruction, kw, response):
    if not response.strip():
        return False
    if instruction == "punctuation:no_comma":
        return "," not in response
    if instruction == "length_constraints:number_words":
        return len(response.split()) < kw["num_words"]
    if instruction == "change_case:english_lowercase":
        return response == response.lower()
    return response.strip().endswith(kw["end_phrase"])


def _loose(response):
    lines = response.split("\\n")
    variants = [response, "\\n".join(lines[1:]).strip(), "\\n".join(lines[:-1]).strip(), "\\n".join(lines[1:-1]).strip()]
    return variants + [v.replace("*", "") for v in variants]


def process_results(doc, results):
    response = results[0]
    pairs = list(zip(doc["instruction_id_list"], doc["kwargs"]))
    strict = [_follows(i, kw, response) for i, kw in pairs]
    loose = [any(_follows(i, kw, r) for r in _loose(response)) for i, kw in pairs]
    return {"prompt_level_strict_acc": all(strict), "inst_level_strict_acc": strict,
            "prompt_level_loose_acc": all(loose), "inst_level_loose_acc": loose}


def agg_inst_level_acc(items):
    flat = [x for item in items for x in item]
    return sum(flat) / len(flat)
''', encoding="utf-8")
    metrics = "".join(f"  - metric: {m}\n    aggregation: {'!function utils.agg_inst_level_acc' if 'inst' in m else 'mean'}\n"
                      f"    higher_is_better: true\n" for m in ("prompt_level_strict_acc", "inst_level_strict_acc",
                                                                 "prompt_level_loose_acc", "inst_level_loose_acc"))
    (folder / "ifeval_like.yaml").write_text(f"""task: zagreus_test_ifeval_like
dataset_path: json
dataset_kwargs:
  data_files:
    train: {folder / 'ifeval_like.jsonl'}
output_type: generate_until
test_split: train
num_fewshot: 0
doc_to_text: prompt
doc_to_target: 0
generation_kwargs:
  until: []
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_gen_toks}
process_results: !function utils.process_results
metric_list:
{metrics}metadata:
  version: 1.0
""", encoding="utf-8")
    return folder / "ifeval_like.yaml"


def test_ifeval_like_task_run_matches_hflm(export, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from zagreus.eval.lm import make_lm
    from zagreus.eval.run import run_tasks

    task = str(write_ifeval_like_task(tmp_path))
    name = "zagreus_test_ifeval_like"
    ours, ours_raw = run_tasks(make_lm(export, batch_size=4), [task], log_samples=True)
    ref, ref_raw = run_tasks(HFLM(pretrained=str(export), batch_size=4, device="cpu"), [task], log_samples=True)
    keys = {"prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"}
    assert set(ours[name]["metrics"]) == set(ref[name]["metrics"]) == keys
    assert ours[name]["metrics"] == ref[name]["metrics"]
    assert ours[name]["metric"] == "prompt_level_strict_acc" and ours[name]["samples"] == len(PROMPTS)
    # Not all zero: the checks see the replies.
    assert 0 < ours[name]["metrics"]["inst_level_loose_acc"]
    a = sorted(ours_raw["samples"][name], key=lambda s: s["doc_id"])
    b = sorted(ref_raw["samples"][name], key=lambda s: s["doc_id"])
    assert [s["resps"] for s in a] == [s["resps"] for s in b]


def test_argmax_rows_is_argmax():
    """The blocked CPU argmax picks torch's argmax ids: first of equal maxima, across and within
    blocks, in a last block narrower than the rest, rows all -inf."""
    import torch

    from zagreus.model.generate import argmax_rows

    gen = torch.Generator().manual_seed(0)
    for vocab, block in ((128256, 1024), (10000, 1000), (9000, 1024), (300, 1024)):
        x = torch.randn(9, vocab, generator=gen)
        top = x.max() + 1
        x[1, [5, 3000 % vocab, vocab - 1]] = top  # a tie across blocks: the first wins
        x[2, [1023 % vocab, 1024 % vocab]] = top  # on a block edge
        x[3, vocab - 1] = top  # in the last, narrow block
        x[4] = float("-inf")
        x[5, :] = 0.5  # every entry equal
        assert torch.equal(argmax_rows(x, block), x.argmax(-1)), (vocab, block)
