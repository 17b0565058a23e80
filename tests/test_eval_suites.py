"""The report's suites by name, and the tasks lm-eval lacks (the Portuguese leaderboard's, ifeval-ita).

Each shipped task runs end to end through lm-eval on a few documents this file writes to a
--data-dir: with a scripted model whose replies are chosen per document (so every metric is known
by hand: acc, f1_macro, pearson, mse, IFEval's accuracies), and OAB with the tiny random export too
(its acc recomputed from the logged replies). The suites expand to the report's tasks and few-shot
counts, the offline flavour runs the shipped twins, and every task of every suite files under the
right language.
"""

from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path

import pytest

from zagreus.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

# --- documents -----------------------------------------------------------------------------------
# A scored document carries a marker '#k' (k: its index) that the scripted model looks up; few-shot
# documents carry none, so the last marker of a prompt is the scored document's.


def _write(folder: Path, name: str, rows: list[dict]) -> None:
    (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _exam(doc_id: str, letters: str, gold: str, marker: int | None = None) -> dict:
    mark = f" #{marker}" if marker is not None else ""
    return {"id": doc_id, "exam_id": doc_id.split("_")[0], "question": f"Questão {doc_id}{mark}",
            "choices": {"text": [f"opção {c.lower()}" for c in letters], "label": list(letters)}, "answerKey": gold}


# Per task: the golds of the scored documents, the replies the model gives, and the expected metrics.
ENEM = (["A", "B", "C", "D"], ["A", "Letra B", "a resposta é (D)", ""], {"acc": 2 / 4})
BLUEX = (["E", "A", "B"], ["E) porque sim", "B", "Alternativa A"], {"acc": 1 / 3})
OAB = (["A", "B", "C"], ["Resposta correta: C", "B", "E"], {"acc": 1 / 3})
# entailment_judgment 1 -> Sim. Replies: exact, accents off, one label inside, nothing close ('[invalid]').
RTE = ([1, 0, 1, 0], ["Sim", "nao", "Sim, pode.", "talvez"], {"acc": 3 / 4, "f1_macro": (1 + 2 / 3) / 2})
STS_GOLD, STS_PRED = [1.0, 2.5, 4.0, 5.0], [1.0, 2.5, 4.05, 5.0]  # 'nota 4.0 de 5' reads 4.05; 'muito' falls back to 5
STS = (STS_GOLD, ["1", "2,5", "nota 4.0 de 5", "muito"], {"mse": sum((g - p) ** 2 for g, p in zip(STS_GOLD, STS_PRED)) / 4})
FAQUAD = ([1, 0, 0], ["Sim", "Sim", "Não."], {"acc": 2 / 3, "f1_macro": 2 / 3})
HATEBR = ([1, 0], ["sim", "Não"], {"acc": 1.0, "f1_macro": 1.0})
PT_HATE = ([1, 1, 0], ["Não", "Sim", "Não"], {"acc": 2 / 3, "f1_macro": 2 / 3})
# 'neutra' is one edit from Neutro.
TWEETS = (["Positive", "Negative", "Neutral", "Positive"], ["Positivo", "negativo!", "neutra", "Neutro"],
          {"acc": 3 / 4, "f1_macro": (2 / 3 + 1 + 2 / 3) / 3})
# IFEval: (instructions, kwargs), reply. Doc 0 follows both, doc 1 breaks its one, doc 2 one of two.
IFEVAL = [((["punctuation:no_comma", "keywords:existence"], [{}, {"keywords": ["sole"]}]), "il sole splende"),
          ((["punctuation:no_comma"], [{}]), "sì, certo"),
          ((["punctuation:no_comma", "keywords:existence"], [{}, {"keywords": ["luna"]}]), "il sole splende")]
IFEVAL_METRICS = {"prompt_level_strict_acc": 1 / 3, "inst_level_strict_acc": 3 / 5,
                  "prompt_level_loose_acc": 1 / 3, "inst_level_loose_acc": 3 / 5}


def write_pt_files(folder: Path) -> Path:
    """Every file of the shipped Portuguese tasks and ifeval-ita, a few scored documents each, the few-shot ids included."""
    from zagreus.eval.tasks import pt_leaderboard as pt

    folder.mkdir(parents=True, exist_ok=True)
    shots = lambda ids, letters: [_exam(i, letters, letters[k % len(letters)]) for k, i in enumerate(ids)]  # noqa: E731
    _write(folder, "enem_challenge_train.jsonl",
           shots(pt.ENEM_SHOTS, "ABCDE") + [_exam(f"2023_{k}", "ABCDE", g, k) for k, g in enumerate(ENEM[0])])
    _write(folder, "bluex_train.jsonl",
           shots(pt.BLUEX_SHOTS, "ABCDE") + [_exam(f"USP_2024_{k}", "ABCDE", g, k) for k, g in enumerate(BLUEX[0])])
    _write(folder, "oab_exams_train.jsonl",
           shots(pt.OAB_SHOTS, "ABCD") + [_exam(f"2012-06_{k}", "ABCD", g, k) for k, g in enumerate(OAB[0])])
    pair = lambda i, ent, score, mark="": {"sentence_pair_id": i, "premise": f"Premissa {i}{mark}",  # noqa: E731
                                           "hypothesis": f"Hipótese {i}", "relatedness_score": score,
                                           "entailment_judgment": ent}
    # The few-shot ids in another order than the list's, and some rows that are not few-shots.
    train_ids = sorted(pt.ASSIN2_SHOTS) + [100, 101]
    _write(folder, "assin2_train.jsonl", [pair(i, i % 2, 1.0 + i % 5, "") for i in train_ids])
    _write(folder, "assin2_test.jsonl", [pair(9000 + k, ent, score, f" #{k}")
                                         for k, (ent, score) in enumerate(zip(RTE[0], STS_GOLD))])
    qa = lambda q, label: {"document_index": 0, "document_title": "t", "paragraph_index": 0,  # noqa: E731
                           "question": q, "answer": "uma resposta", "label": label}
    _write(folder, "faquad_nli_train.jsonl", [qa(f"pergunta {i}", i % 2) for i in range(max(pt.FAQUAD_SHOT_ROWS) + 1)])
    _write(folder, "faquad_nli_test.jsonl", [qa(f"teste #{k}", g) for k, g in enumerate(FAQUAD[0])])
    for name, ids, (golds, _, _) in (("hatebr_offensive", pt.HATEBR_SHOTS, HATEBR),
                                     ("portuguese_hate_speech", pt.PT_HATE_SHOTS, PT_HATE)):
        _write(folder, f"{name}_train.jsonl", [{"idx": i, "sentence": f"texto {i}", "label": i % 2} for i in ids + [777]])
        _write(folder, f"{name}_test.jsonl", [{"idx": 5000 + k, "sentence": f"texto #{k}", "label": g}
                                              for k, g in enumerate(golds)])
    _write(folder, "tweetsentbr_train.jsonl", [{"id": str(i), "sentence": f"tweet {i}", "label": ["Positive", "Negative", "Neutral"][i % 3]}
                                               for i in range(30)])
    _write(folder, "tweetsentbr_test.jsonl", [{"id": f"t{k}", "sentence": f"tweet #{k}", "label": g}
                                              for k, g in enumerate(TWEETS[0])])
    _write(folder, "ifeval_ita_input_data.jsonl",
           [{"key": 1000 + k, "prompt": f"Scrivi una frase senza virgole. #{k}", "instruction_id_list": ids, "kwargs": kw}
            for k, ((ids, kw), _) in enumerate(IFEVAL)])
    return folder


REPLIES = {"zagreus_enem_challenge": ENEM[1], "zagreus_bluex": BLUEX[1], "zagreus_oab_exams": OAB[1],
           "zagreus_assin2_rte": RTE[1], "zagreus_assin2_sts": STS[1], "zagreus_faquad_nli": FAQUAD[1],
           "zagreus_hatebr_offensive": HATEBR[1], "zagreus_portuguese_hate_speech": PT_HATE[1],
           "zagreus_tweetsentbr": TWEETS[1], "zagreus_ifeval_ita": [r for _, r in IFEVAL]}


def scripted_lm(replies: list[str]):
    """An lm-eval LM that answers each prompt with the reply of its scored document's marker."""
    from lm_eval.api.model import LM

    class Scripted(LM):
        def __init__(self):
            super().__init__()
            self.prompts: dict[int, str] = {}

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for req in requests:
                prompt = req.args[0]
                k = int(re.findall(r"#(\d+)", prompt)[-1])
                self.prompts[k] = prompt
                out.append(replies[k])
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    return Scripted()


@pytest.fixture(scope="module")
def pt_dir(tmp_path_factory) -> Path:
    return write_pt_files(tmp_path_factory.mktemp("pt"))


@pytest.fixture(scope="module")
def ifeval_checkers():
    """lm-eval's IFEval checkers import langdetect and immutabledict at module level. Where they are not
    installed, stand-ins let the checkers load; the instructions used here (no_comma, keywords) call neither."""
    stubs = {}
    for name in ("langdetect", "immutabledict"):
        try:
            __import__(name)
        except ImportError:
            mod = types.ModuleType(name)
            if name == "langdetect":
                mod.detect = lambda text: "it"
                mod.LangDetectException = type("LangDetectException", (Exception,), {})
            else:
                mod.immutabledict = lambda *a, **k: types.MappingProxyType(dict(*a, **k))
            mod.__spec__ = importlib_spec(name)
            stubs[name] = mod
    saved = {n: sys.modules.get(n) for n in stubs}
    sys.modules.update(stubs)
    yield
    for n, m in saved.items():
        if m is None:
            sys.modules.pop(n, None)
        else:
            sys.modules[n] = m


def importlib_spec(name: str):
    from importlib.machinery import ModuleSpec

    return ModuleSpec(name, None)


# --- the shipped tasks, end to end ---------------------------------------------------------------

@pytest.mark.parametrize("task,expected", [
    ("zagreus_enem_challenge", ENEM[2]), ("zagreus_bluex", BLUEX[2]), ("zagreus_oab_exams", OAB[2]),
    ("zagreus_assin2_rte", RTE[2]), ("zagreus_assin2_sts", STS[2]), ("zagreus_faquad_nli", FAQUAD[2]),
    ("zagreus_hatebr_offensive", HATEBR[2]), ("zagreus_portuguese_hate_speech", PT_HATE[2]),
    ("zagreus_tweetsentbr", TWEETS[2]), ("zagreus_ifeval_ita", IFEVAL_METRICS),
])
def test_shipped_task_metrics_by_hand(task, expected, pt_dir, ifeval_checkers):
    from zagreus.eval.registry import report_metric
    from zagreus.eval.run import run_tasks

    lm = scripted_lm(REPLIES[task])
    summary, raw = run_tasks(lm, [task], data_dir=pt_dir, log_samples=True)
    entry = summary[task]
    n = len(REPLIES[task])
    assert entry["samples"] == n == len(raw["samples"][task])  # few-shot items of the same split are not scored
    for metric, value in expected.items():
        assert entry["metrics"][metric] == pytest.approx(value, abs=1e-9), metric
    assert entry["metric"] == report_metric(task) and entry["value"] == entry["metrics"][entry["metric"]]
    if task == "zagreus_assin2_sts":
        g = [x - sum(STS_GOLD) / 4 for x in STS_GOLD]
        p = [x - sum(STS_PRED) / 4 for x in STS_PRED]
        r = sum(a * b for a, b in zip(g, p)) / math.sqrt(sum(a * a for a in g) * sum(b * b for b in p))
        assert entry["metrics"]["pearson"] == pytest.approx(abs(r), abs=1e-9)
        assert entry["metric"] == "pearson"
    assert set(lm.prompts) == set(range(n))


def test_few_shot_prompts_follow_the_leaderboard(pt_dir):
    """The fork's prompt layout: description, the fixed few-shot ids in list order with their answers, the item."""
    from zagreus.eval.run import run_tasks
    from zagreus.eval.tasks import pt_leaderboard as pt

    lm = scripted_lm(ENEM[1])
    run_tasks(lm, ["zagreus_enem_challenge"], data_dir=pt_dir)
    prompt = lm.prompts[0]
    shots = "".join(f"Pergunta:\nQuestão {i}\nAlternativas:\nA. opção a\nB. opção b\nC. opção c\nD. opção d\nE. opção e\n"
                    f"Resposta correta: {'ABCDE'[k]}\n\n" for k, i in enumerate(pt.ENEM_SHOTS))
    assert prompt == ("As perguntas a seguir são questões de múltipla escolha do Exame Nacional do "
                      "Ensino Médio (ENEM), selecione a única alternativa correta e responda apenas com as letras "
                      "\"A\", \"B\", \"C\", \"D\" ou \"E\".\n\n" + shots +
                      "Pergunta:\nQuestão 2023_0 #0\nAlternativas:\nA. opção a\nB. opção b\nC. opção c\nD. opção d\n"
                      "E. opção e\nResposta correta:")

    lm = scripted_lm(RTE[1])
    run_tasks(lm, ["zagreus_assin2_rte"], data_dir=pt_dir)
    premises = re.findall(r"Premissa: Premissa (\d+)", lm.prompts[0])
    assert [int(x) for x in premises] == pt.ASSIN2_SHOTS[:15] + [9000]
    assert "Pergunta: A hipótese pode ser inferida pela premissa? Sim ou Não?\nResposta: Não\n\n" in lm.prompts[0]

    lm = scripted_lm(FAQUAD[1])
    run_tasks(lm, ["zagreus_faquad_nli"], data_dir=pt_dir, num_fewshot=4)  # a count given overrides the task's 15
    assert re.findall(r"Pergunta: pergunta (\d+)", lm.prompts[0]) == [str(i) for i in pt.FAQUAD_SHOT_ROWS[:4]]

    lm = scripted_lm(HATEBR[1])
    run_tasks(lm, ["zagreus_hatebr_offensive"], data_dir=pt_dir)
    assert lm.prompts[0].count("Texto: ") == 26 and lm.prompts[0].endswith("Texto: texto #0\nPergunta: O texto é ofensivo?\nResposta:")

    lm = scripted_lm(STS[1])
    run_tasks(lm, ["zagreus_assin2_sts"], data_dir=pt_dir, num_fewshot=2)
    # Premise 1 scores 1 + 1 % 5 = 2.0, written the Brazilian way.
    assert "Frase 1: Premissa 1\nFrase 2: Hipótese 1\nPergunta: Quão similares são as duas frases? Dê uma pontuação " \
           "entre 1,0 a 5,0.\nResposta: 2,0\n\n" in lm.prompts[0]


def test_answer_parsing_edge_cases():
    from zagreus.eval.tasks.pt_leaderboard import choice_letter, closest_label, similarity_score

    assert choice_letter("  C  ", "ABCDE") == "C"
    assert choice_letter("A alternativa correta é a letra D.", "ABCDE") == "D"
    assert choice_letter("Opção: B", "ABCDE") == "B"
    assert choice_letter("nenhuma", "ABCD") == "[invalid]"
    assert closest_label("NÃO", ["Sim", "Não"]) == "Não"
    assert closest_label("Não e sim", ["Sim", "Não"]) == "Não"  # both inside: the first 3 letters, 'nao', decide
    assert closest_label("", ["Sim", "Não"]) == "[invalid]"
    assert similarity_score("4,5") == 4.5 and similarity_score("7") == 5.0 and similarity_score("0.2") == 1.0
    assert similarity_score("1.234.5") == 1.2345 and similarity_score("sem número") == 5.0


def test_oab_with_the_tiny_model(pt_dir, tmp_path_factory):
    """The random export generates (greedy, 32 tokens); acc is the mean of the letters parsed from its replies."""
    from test_eval_lm import build_export

    from zagreus.eval.lm import make_lm
    from zagreus.eval.run import run_tasks
    from zagreus.eval.tasks.pt_leaderboard import choice_letter
    from zagreus.tokenizer import train_bpe

    tok = tmp_path_factory.mktemp("tok")
    train_bpe([(pt_dir / "oab_exams_train.jsonl").read_text(encoding="utf-8")] * 20, 600, tok)
    lm = make_lm(build_export(tmp_path_factory.mktemp("export"), tok), batch_size=4)
    summary, raw = run_tasks(lm, ["zagreus_oab_exams"], data_dir=pt_dir, log_samples=True)
    samples = raw["samples"]["zagreus_oab_exams"]
    assert len(samples) == 3 and summary["zagreus_oab_exams"]["num_fewshot"] is None
    replies = [s["resps"][0][0] for s in samples]
    want = sum(choice_letter(r, "ABCD") == s["doc"]["answerKey"] for r, s in zip(replies, samples)) / 3
    assert summary["zagreus_oab_exams"]["metrics"]["acc"] == pytest.approx(want)
    assert [s["acc"] for s in samples] == [float(choice_letter(r, "ABCD") == s["doc"]["answerKey"])
                                           for r, s in zip(replies, samples)]


def test_data_from_hub_or_local_files(pt_dir, tmp_path):
    """Without the files a shipped task reads its hub dataset; with all of them, the files; with a part, an error."""
    import shutil

    from zagreus.eval.registry import hub_dataset, local_files, reads_hub, task_specs

    spec = task_specs(["zagreus_hatebr_offensive"])[0]
    assert (spec["dataset_path"], spec["dataset_name"]) == ("eduagarcia/portuguese_benchmark", "HateBR_offensive_binary")
    assert hub_dataset("zagreus_hatebr_offensive") == "eduagarcia/portuguese_benchmark/HateBR_offensive_binary"
    assert task_specs(["zagreus_ifeval_ita"], tmp_path)[0]["dataset_path"] == "mii-llm/ifeval-ita"  # folder without its file
    local = task_specs(["zagreus_hatebr_offensive"], pt_dir)[0]
    assert local["dataset_path"] == "json" and "dataset_name" not in local
    assert local["dataset_kwargs"]["data_files"] == {"train": str(pt_dir / "hatebr_offensive_train.jsonl"),
                                                     "test": str(pt_dir / "hatebr_offensive_test.jsonl")}
    assert reads_hub(["zagreus_hatebr_offensive"]) and not reads_hub(["zagreus_hatebr_offensive"], pt_dir)
    assert reads_hub(["zagreus_arc_it", "arc_it"], pt_dir)  # lm-eval's own tasks may always
    shutil.copy(pt_dir / "faquad_nli_train.jsonl", tmp_path / "faquad_nli_train.jsonl")
    with pytest.raises(UserError, match=r"faquad_nli_test.jsonl not found; put faquad_nli_test.jsonl in --data-dir "
                                        r"\(or none of them, to read ruanchaves/faquad-nli from the hub\)"):
        task_specs(["zagreus_faquad_nli"], tmp_path)
    with pytest.raises(UserError, match="reads local files; pass --data-dir"):  # the okapi twins stay offline-only
        task_specs(["zagreus_arc_it"])
    assert local_files("zagreus_assin2_sts") == ["assin2_train.jsonl", "assin2_test.jsonl"]
    # A local file that is a part of the split lacks the leaderboard's few-shot ids: said in one line.
    first = json.loads((pt_dir / "faquad_nli_train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    _write(tmp_path, "faquad_nli_train.jsonl", [first])
    shutil.copy(pt_dir / "faquad_nli_test.jsonl", tmp_path / "faquad_nli_test.jsonl")
    from zagreus.eval.run import run_tasks

    with pytest.raises(UserError, match="few-shot row 2918 is past the split's 1 rows"):
        run_tasks(scripted_lm(FAQUAD[1]), ["zagreus_faquad_nli"], data_dir=tmp_path)


def test_ifeval_tasks_need_the_checkers_packages(monkeypatch):
    import importlib.util

    from zagreus.eval import registry

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "langdetect" else real(name, *a))
    with pytest.raises(UserError, match=r"task zagreus_ifeval_ita is scored by lm-eval's IFEval checkers, which need "
                                        r"langdetect.*pip install 'lm-eval\[ifeval\]'"):
        registry.check_task_requirements(["zagreus_arc_it", "zagreus_ifeval_ita"])
    registry.check_task_requirements(["zagreus_arc_it", "zagreus_enem_challenge"])


# --- suites ----------------------------------------------------------------------------------------

LANGUAGES = {
    "report-ita": {"m_mmlu_it": "it", "hellaswag_it": "it", "arc_it": "it"},
    "report-spa": {"m_mmlu_es": "es", "hellaswag_es": "es", "arc_es": "es"},
    "report-fra": {"m_mmlu_fr": "fr", "hellaswag_fr": "fr", "arc_fr": "fr"},
    "report-por": {"m_mmlu_pt": "pt", "hellaswag_pt": "pt", "arc_pt": "pt"},
    "report-eng": {"mmlu": "en", "hellaswag": "en", "arc_challenge": "en"},
    "nesso": {"ifeval": "en", "arc_challenge": "en", "hellaswag": "en", "mmlu": "en",
              "zagreus_ifeval_ita": "it", "arc_it": "it", "hellaswag_it": "it", "m_mmlu_it": "it"},
    "evalita-mp": {"evalita-mp": "it"},
    "pt-leaderboard": {f"zagreus_{t}": "pt" for t in ("assin2_rte", "assin2_sts", "bluex", "enem_challenge", "faquad_nli",
                                                      "hatebr_offensive", "oab_exams", "portuguese_hate_speech", "tweetsentbr")},
    "report-ita-offline": {"zagreus_m_mmlu_it": "it", "zagreus_hellaswag_it": "it", "zagreus_arc_it": "it"},
    "report-spa-offline": {"zagreus_m_mmlu_es": "es", "zagreus_hellaswag_es": "es", "zagreus_arc_es": "es"},
    "report-fra-offline": {"zagreus_m_mmlu_fr": "fr", "zagreus_hellaswag_fr": "fr", "zagreus_arc_fr": "fr"},
    "report-por-offline": {"zagreus_m_mmlu_pt": "pt", "zagreus_hellaswag_pt": "pt", "zagreus_arc_pt": "pt"},
}


def test_every_suite_task_has_its_language():
    from zagreus.eval.registry import task_language
    from zagreus.eval.suites import SUITES, suite_names, suite_tasks

    assert sorted(suite_names()) == sorted(LANGUAGES) and set(SUITES) <= set(LANGUAGES)
    for suite, langs in LANGUAGES.items():
        assert [t for t, _ in suite_tasks(suite)] == list(langs), suite
        for task, lang in langs.items():
            assert task_language(task) == lang, (suite, task)
    # What lm-eval reports under those names: the groups' subtasks and the report's short names.
    for task, lang in {"evalita-mp_te_prompt-1": "it", "evalita-mp_ner_adg_p1": "it", "mmlu_abstract_algebra": "en",
                       "ifeval-ita": "it", "enem_challenge": "pt", "assin2_sts": "pt", "portuguese_hate_speech": "pt",
                       "tweetsentbr": "pt", "ifeval_es": "es", "arc_challenge": "en", "zagreus_arc_challenge_en": "en"}.items():
        assert task_language(task) == lang, task


def test_report_metrics():
    from zagreus.eval.registry import report_metric

    expected = {"zagreus_assin2_sts": "pearson", "assin2_sts": "pearson", "zagreus_assin2_rte": "f1_macro",
                "zagreus_faquad_nli": "f1_macro", "zagreus_hatebr_offensive": "f1_macro",
                "zagreus_portuguese_hate_speech": "f1_macro", "zagreus_tweetsentbr": "f1_macro",
                "zagreus_enem_challenge": "acc", "zagreus_bluex": "acc", "zagreus_oab_exams": "acc",
                "zagreus_ifeval_ita": "prompt_level_strict_acc", "ifeval": "prompt_level_strict_acc",
                "m_mmlu_it": "acc", "mmlu": "acc", "arc_it": "acc_norm", "hellaswag": "acc_norm",
                "evalita-mp": "acc", "evalita-mp_te": "acc", "evalita-mp_hs": "f1", "evalita-mp_sum_fp": "rouge1"}
    assert {t: report_metric(t) for t in expected} == expected


def test_suites_expand_with_their_few_shot_counts():
    from zagreus.eval.suites import expand

    assert expand(["report-ita"]) == (["m_mmlu_it", "hellaswag_it", "arc_it"], {"m_mmlu_it": 5, "hellaswag_it": 0, "arc_it": 0})
    # A number is the user's override for every task; a mapping overrides the tasks it names.
    assert expand(["report-ita"], 2) == (["m_mmlu_it", "hellaswag_it", "arc_it"], 2)
    assert expand(["report-ita", "zagreus_arc_it"], {"arc_it": 25})[1] == {"m_mmlu_it": 5, "hellaswag_it": 0, "arc_it": 25}
    # Mixed with tasks, overlapping suites run a task once; the report's names of tasks lm-eval lacks are ours.
    tasks, shots = expand(["nesso", "report-eng", "ifeval-ita", "enem_challenge"])
    assert tasks == ["ifeval", "arc_challenge", "hellaswag", "mmlu", "zagreus_ifeval_ita", "arc_it", "hellaswag_it",
                     "m_mmlu_it", "zagreus_enem_challenge"]
    assert shots["mmlu"] == 5 and shots["m_mmlu_it"] == 5 and "zagreus_enem_challenge" not in shots
    assert expand(["pt-leaderboard"])[1]["zagreus_hatebr_offensive"] == 25
    assert expand(["evalita-mp"]) == (["evalita-mp"], {})
    assert expand(["arc_it", "zagreus_arc_it"]) == (["arc_it", "zagreus_arc_it"], None)  # no suite: as given
    with pytest.raises(UserError, match=r"suite nesso has no offline flavour: ifeval, mmlu ship no offline twin"):
        expand(["nesso-offline"])
    with pytest.raises(UserError, match=r"suite pt-leaderboard has no offline flavour: its tasks read --data-dir"):
        expand(["pt-leaderboard-offline"])


def test_cli_report_ita_runs_m_mmlu_5_shot(monkeypatch, tmp_path_factory):
    """`zagreus eval MODEL --tasks report-ita` hands run_tasks the report's three tasks, m_mmlu_it 5-shot."""
    from test_eval_lm import build_export
    from typer.testing import CliRunner

    from zagreus.cli import app
    from zagreus.eval import run
    from zagreus.tokenizer import train_bpe

    tok = tmp_path_factory.mktemp("tok")
    train_bpe(["una frase italiana qualsiasi per il vocabolario"] * 30, 300, tok)
    export = build_export(tmp_path_factory.mktemp("export"), tok)
    seen = {}

    def fake_run_tasks(lm, tasks, num_fewshot=None, **kwargs):
        seen.update(tasks=tasks, num_fewshot=num_fewshot)
        return {t: {"metric": "acc", "value": 0.5, "metrics": {"acc": 0.5}, "samples": 1} for t in tasks}, \
            {"tiebreak": None, "group_subtasks": {}}

    monkeypatch.setattr(run, "run_tasks", fake_run_tasks)
    result = CliRunner().invoke(app, ["eval", str(export), "--tasks", "report-ita", "--out", str(export / "r.json")])
    assert result.exit_code == 0, result.output
    assert seen == {"tasks": ["m_mmlu_it", "hellaswag_it", "arc_it"], "num_fewshot": {"m_mmlu_it": 5, "hellaswag_it": 0, "arc_it": 0}}
    assert json.loads((export / "r.json").read_text())["num_fewshot"] == {"m_mmlu_it": 5, "hellaswag_it": 0, "arc_it": 0}


def test_offline_flavour_runs_the_shipped_twins(tmp_path):
    """report-ita-offline: zagreus_m_mmlu_it 5-shot (its dev split), zagreus_hellaswag_it and zagreus_arc_it 0-shot."""
    from test_eval_lm import write_arc_task_files

    from zagreus.eval.run import run_tasks

    write_arc_task_files(tmp_path, n_test=3, n_val=2)
    mmlu = [{"instruction": f"Domanda {i}?", "option_a": "uno", "option_b": "due", "option_c": "tre", "option_d": "quattro",
             "answer": "ABCD"[i % 4]} for i in range(8)]
    _write(tmp_path, "m_mmlu_it_val.json", mmlu[:3])
    _write(tmp_path, "m_mmlu_it_dev.json", mmlu[3:])
    hs = [{"ctx_a": "Un uomo è sul tetto.", "ctx_b": "lui", "activity_label": "Tetto", "endings": ["a.", "b.", "c.", "d."],
           "label": str(i % 4)} for i in range(3)]
    _write(tmp_path, "m_hellaswag_it_val.json", hs)

    from lm_eval.api.model import LM

    class Flat(LM):  # every choice equally likely: ties go to choice A
        def __init__(self):
            super().__init__()
            self.contexts = []

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self.contexts += [r.args[0] for r in requests]
            return [(-1.0, False) for _ in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    lm = Flat()
    summary, _ = run_tasks(lm, ["report-ita-offline"], data_dir=tmp_path)
    assert {t: e["num_fewshot"] for t, e in summary.items()} == {"zagreus_m_mmlu_it": 5, "zagreus_hellaswag_it": 0,
                                                                 "zagreus_arc_it": 0}
    mmlu_ctx = [c for c in lm.contexts if "Domanda 0?" in c]
    assert mmlu_ctx and all(c.count("Answer:") == 6 for c in mmlu_ctx)  # five shots from dev, then the item
    assert summary["zagreus_m_mmlu_it"]["metrics"]["acc"] == pytest.approx(1 / 3)  # golds A, B, C


def test_unknown_suite_or_task_is_one_line():
    from zagreus.eval.run import evaluate

    with pytest.raises(UserError) as err:
        evaluate("/nonexistent/model", ["report-itaa"])
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("unknown task 'report-itaa'; closest: report-ita")
    assert "suites: report-ita, report-spa" in msg
