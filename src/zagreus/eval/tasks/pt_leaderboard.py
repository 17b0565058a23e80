"""The Open Portuguese LLM Leaderboard's tasks on lm-eval 0.4.13: prompts, few-shot picks, answer parsing, metrics.

The leaderboard runs its own lm-eval fork (eduagarcia/lm-evaluation-harness-pt, tasks in
lm_eval/tasks/portuguese/ and lm_eval/tasks/oab_exams/). That fork adds a few-shot sampler by
document id, answer filters and aggregations lm-eval 0.4.13 lacks; they are redone here:

- few-shot examples: the fork's fixed id lists, in list order (`fewshot_config.process_docs` picks
  them, `sampler: first_n` takes the first k); for the exams, whose few-shots come from the scored
  split, every listed id is also left out of the scored documents, as the fork does;
- answer parsing (`process_results`): the fork's filter chains, written out -- the letter of a
  multiple-choice answer, the closest of a few labels (Sim/Não, Positivo/Neutro/Negativo), a
  number clipped to 1..5;
- metrics: acc, f1_macro (sklearn, macro over the gold labels), pearson (|r|, 0 when undefined)
  and mse, under the names the leaderboard reports.

lm-eval imports this file by path (`!function pt_leaderboard.*`), so it must stay self-contained
(zagreus.errors aside).
"""

from __future__ import annotations

import re
import unicodedata

from zagreus.errors import UserError

# Few-shot ids of the fork's task YAMLs (its comments: ENEM's from piresramon/gpt-4-enem; BLUEX's
# from several subjects and universities; one OAB question per type; 50 balanced ASSIN2/HateBR/
# hate-speech training items in random order; 50 random FaQuAD-NLI training rows, by position).
ENEM_SHOTS = ["2022_21", "2022_88", "2022_143"]
BLUEX_SHOTS = ["USP_2018_3", "UNICAMP_2018_2", "USP_2018_35", "UNICAMP_2018_16", "USP_2018_89"]
OAB_SHOTS = ["2010-01_1", "2010-01_11", "2010-01_13", "2010-01_23", "2010-01_26", "2010-01_28", "2010-01_38",
             "2010-01_48", "2010-01_58", "2010-01_68", "2010-01_76", "2010-01_83", "2010-01_85", "2010-01_91",
             "2010-01_99"]
ASSIN2_SHOTS = [1, 3251, 2, 3252, 3, 4, 5, 6, 3253, 7, 3254, 3255, 3256, 8, 9, 10, 3257, 11, 3258, 12, 13, 14, 15,
                3259, 3260, 3261, 3262, 3263, 16, 17, 3264, 18, 3265, 3266, 3267, 19, 20, 3268, 3269, 21, 3270, 3271,
                22, 3272, 3273, 23, 3274, 24, 25, 3275]
FAQUAD_SHOT_ROWS = [1893, 949, 663, 105, 1169, 2910, 2227, 2813, 974, 558, 1503, 1958, 2918, 601, 1560, 984, 2388,
                    995, 2233, 1982, 165, 2788, 1312, 2285, 522, 1113, 1670, 323, 236, 1263, 1562, 2519, 1049, 432,
                    1167, 1394, 2022, 2551, 2194, 2187, 2282, 2816, 108, 301, 1185, 1315, 1420, 2436, 2322, 766]
HATEBR_SHOTS = [48, 44, 36, 20, 3511, 88, 3555, 16, 56, 3535, 60, 40, 3527, 4, 76, 3579, 3523, 3551, 68, 3503, 84,
                3539, 64, 3599, 80, 3563, 3559, 3543, 3547, 3587, 3595, 3575, 3567, 3591, 24, 96, 92, 3507, 52, 72, 8,
                3571, 3515, 3519, 3531, 28, 32, 0, 12, 3583]
PT_HATE_SHOTS = [52, 50, 39, 28, 3, 105, 22, 25, 60, 11, 66, 41, 9, 4, 91, 42, 7, 20, 76, 1, 104, 13, 67, 54, 97,
                 27, 24, 14, 16, 48, 53, 40, 34, 49, 32, 119, 114, 2, 58, 83, 18, 36, 5, 6, 10, 35, 38, 0, 21, 46]

INVALID = "[invalid]"
YES_NO = ["Sim", "Não"]
SENTIMENTS = ["Positivo", "Neutro", "Negativo"]


# --- documents ---------------------------------------------------------------------------------

def _pick(dataset, column: str, ids: list):
    """The rows whose `column` is in `ids`, in the order of `ids`; every id must be there."""
    where = {value: row for row, value in enumerate(dataset[column])}
    missing = [i for i in ids if i not in where]
    if missing:
        raise UserError(f"few-shot {column} {', '.join(map(str, missing[:5]))} not in the split "
                        f"({len(missing)} of {len(ids)} missing); use the whole hub split, not a part of it")
    return dataset.select([where[i] for i in ids])


def _drop(dataset, column: str, ids: list):
    left_out = set(ids)
    return dataset.filter(lambda doc: doc[column] not in left_out)


def _rows(dataset, rows: list[int]):
    if max(rows) >= len(dataset):
        raise UserError(f"few-shot row {max(rows)} is past the split's {len(dataset)} rows; "
                        f"use the whole hub split, not a part of it")
    return dataset.select(rows)


def _leave_out(ids: list, column: str = "id"):
    """process_docs of the scored split: without the few-shot items (they come from the same split)."""
    return lambda dataset: _drop(dataset, column, ids)


def _take(ids: list, column: str = "id"):
    """fewshot_config.process_docs: the few-shot items, in the order of `ids`."""
    return lambda dataset: _pick(dataset, column, ids)


enem_docs, enem_shots = _leave_out(ENEM_SHOTS), _take(ENEM_SHOTS)
bluex_docs, bluex_shots = _leave_out(BLUEX_SHOTS), _take(BLUEX_SHOTS)
oab_docs, oab_shots = _leave_out(OAB_SHOTS), _take(OAB_SHOTS)
assin2_shots = _take(ASSIN2_SHOTS, "sentence_pair_id")
hatebr_shots = _take(HATEBR_SHOTS, "idx")
pt_hate_shots = _take(PT_HATE_SHOTS, "idx")


def faquad_shots(dataset):
    return _rows(dataset, FAQUAD_SHOT_ROWS)


def _options(choices: dict) -> str:
    return "\n".join(f"{label}. {text}" for text, label in zip(choices["text"], choices["label"]))


def exam_text(doc: dict) -> str:
    """ENEM and BLUEX: the question, its lettered options, then 'Resposta correta:'."""
    return f"Pergunta:\n{doc['question']}\nAlternativas:\n{_options(doc['choices'])}\nResposta correta:"


def oab_text(doc: dict) -> str:
    return f"Questão:\n{doc['question']}\nAlternativas:\n{_options(doc['choices'])}\nResposta correta:"


def sts_target(doc: dict) -> str:
    """The similarity as Brazilians write it, one decimal: 3.5 -> '3,5'."""
    return f"{float(doc['relatedness_score']):.1f}".replace(".", ",")


def rte_target(doc: dict) -> str:
    return ["Não", "Sim"][int(doc["entailment_judgment"])]


def faquad_target(doc: dict) -> str:
    return ["Não", "Sim"][int(doc["label"])]


def binary_target(doc: dict) -> str:
    """HateBR and Portuguese Hate Speech: label 1 is 'Sim' (offensive, hateful)."""
    return "Sim" if int(doc["label"]) == 1 else "Não"


def sentiment_target(doc: dict) -> str:
    return {"Positive": "Positivo", "Negative": "Negativo"}.get(doc["label"], "Neutro")


# --- answer parsing ----------------------------------------------------------------------------

def _ascii(text: str) -> str:
    """Accents off (ã -> a), as the fork's unidecode step does for Portuguese text."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def choice_letter(reply: str, letters: str) -> str:
    """The answer letter in a reply ('Letra B', 'B)', '... C'), else '[invalid]'; the fork's find_choices."""
    text = _ascii(re.sub(" +", " ", re.sub(r"[\n\r\t]", " ", reply)).strip())
    if text in letters and len(text) == 1:
        return text
    cls = f"[{letters}]"
    patterns = (rf"(?:[Ll]etra|[Aa]lternativa|[Rr]esposta|[Rr]esposta [Cc]orreta|[Rr]esposta [Cc]orreta e|[Oo]pcao):? ({cls})\b",
                rf"\b({cls})\.", rf"\b({cls}) ?[.):-]", rf"\b({cls})$", rf"\b({cls})\b")
    for pattern in patterns:
        if m := re.search(pattern, text):
            return m.group(1)
    return INVALID


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def closest_label(reply: str, labels: list[str]) -> str:
    """The label a free reply means; the fork's find_similar_label.

    Exact (case and accents aside), else the one label the reply contains, else the reply's
    first clause compared by edit distance (normalised similarity >= 0.5), else '[invalid]'.
    """
    norm = [_ascii(label.strip().lower()) for label in labels]
    pred = _ascii(reply.strip().lower())
    if pred in norm:
        return labels[norm.index(pred)]
    if not pred:
        return INVALID
    inside = [k for k, label in enumerate(norm) if label in pred]
    if len(inside) == 1:
        return labels[inside[0]]
    for stop in ".,;:()[]\n":
        pred = pred.split(stop, 1)[0]
    pred = pred[:max(map(len, norm))]
    sims = [1.0 - _edit_distance(pred, label) / (max(len(pred), len(label)) or 1) for label in norm]
    best = max(sims)
    return labels[sims.index(best)] if best >= 0.5 else INVALID


def similarity_score(reply: str, low: float = 1.0, high: float = 5.0, fallback: float = 5.0) -> float:
    """The number in a reply ('3,5' or '3.5'), clipped to [low, high]; `fallback` when there is none."""
    digits = re.sub(r"[^0-9.]", "", reply.replace(",", "."))
    if m := re.search(r"[0-9]\.[0-9]", digits):  # the first dot between digits is the decimal point
        cut = m.start() + 1
        digits = digits[:cut].replace(".", "") + "." + digits[cut + 1:].replace(".", "")
    else:
        digits = digits.replace(".", "")
    try:
        value = float(digits)
    except ValueError:
        return fallback
    return min(max(value, low), high)


# --- per-document results ----------------------------------------------------------------------

def _exam_results(doc: dict, results: list[str], letters: str) -> dict:
    return {"acc": float(choice_letter(results[0], letters) == doc["answerKey"])}


def abcde_results(doc, results):
    return _exam_results(doc, results, "ABCDE")


def abcd_results(doc, results):
    return _exam_results(doc, results, "ABCD")


def _label_results(gold: str, reply: str, labels: list[str]) -> dict:
    pred = closest_label(reply, labels)
    return {"f1_macro": (gold, pred), "acc": float(pred == gold)}


def rte_results(doc, results):
    return _label_results(rte_target(doc), results[0], YES_NO)


def faquad_results(doc, results):
    return _label_results(faquad_target(doc), results[0], YES_NO)


def binary_results(doc, results):
    return _label_results(binary_target(doc), results[0], YES_NO)


def sentiment_results(doc, results):
    return _label_results(sentiment_target(doc), results[0], SENTIMENTS)


def sts_results(doc, results):
    gold, pred = float(doc["relatedness_score"]), similarity_score(results[0])
    return {"pearson": (gold, pred), "mse": (gold - pred) ** 2}


# --- aggregations ------------------------------------------------------------------------------

def f1_macro(items: list[tuple]) -> float:
    """Macro F1 over the gold labels ('[invalid]' replies count as misses, not as a class)."""
    from sklearn.metrics import f1_score  # lm-eval's own f1 imports sklearn the same way

    golds, preds = zip(*items)
    return float(f1_score(golds, preds, labels=sorted(set(golds)), average="macro"))


def pearson(items: list[tuple]) -> float:
    """|Pearson r| of gold and predicted similarity; 0 when undefined (constant predictions), as the fork."""
    import math
    import warnings

    from scipy.stats import pearsonr

    golds, preds = zip(*items)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: r is undefined, reported as 0
        r = float(pearsonr(golds, preds)[0]) if len(items) > 1 else math.nan
    return 0.0 if math.isnan(r) else abs(r)
