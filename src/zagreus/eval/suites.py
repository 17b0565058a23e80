"""The technical report's evaluation suites by name: `zagreus eval MODEL --tasks report-ita`.

A suite is a list of tasks, each with the few-shot count the report ran it with (None: the task's
own default). `expand` turns the names of a task list (suites, tasks, or both mixed) into tasks and a
per-task num_fewshot. The report's commands:

- report-ita / -spa / -fra / -por: `m_mmlu_<lang>` 5-shot, `hellaswag_<lang>` and `arc_<lang>` 0-shot
  (lm-eval's okapi tasks; sections 6.1, 6.3-6.5); report-eng: `mmlu` 5-shot, `hellaswag`, `arc_challenge`;
- nesso: the post-trained models' table 7, English and Italian: ifeval, ifeval-ita, ARC, HellaSwag, MMLU;
- evalita-mp: lm-eval's Evalita-LLM group (FBK), its tasks' own prompts and few-shot counts;
- pt-leaderboard: the Open Portuguese LLM Leaderboard's nine tasks (the report's table 6) as its
  lm-eval fork defines them, with their few-shot counts (3 for the exams, 15 for ASSIN2 and
  FaQuAD-NLI, 25 for the rest). lm-eval's own `assin2_rte`/`assin2_sts` are other prompts; the
  suite runs the leaderboard's (`zagreus_assin2_rte`, `zagreus_assin2_sts`).

Offline flavour: `<suite>-offline` runs the shipped `zagreus_*` twin of each lm-eval task (files from
--data-dir, see registry.offline_alternative), e.g. report-ita-offline = zagreus_m_mmlu_it (5-shot),
zagreus_hellaswag_it, zagreus_arc_it. The twins of m_mmlu score the local val split, so their
numbers are not the published ones. Suites with a task that has no twin (mmlu, ifeval,
evalita-mp) have no offline flavour. The `zagreus_*` tasks of pt-leaderboard and nesso read their
files from --data-dir when it holds them and the hub otherwise, in either flavour.

The report's own names for tasks lm-eval lacks (ifeval-ita, enem_challenge, bluex, ...) are accepted
too, as the shipped tasks that define them.
"""

from __future__ import annotations

from zagreus.errors import UserError
from zagreus.eval.registry import offline_alternative

OFFLINE = "-offline"

_LANGS = {"ita": "it", "spa": "es", "fra": "fr", "por": "pt"}

SUITES: dict[str, tuple[tuple[str, int | None], ...]] = {
    **{f"report-{name}": ((f"m_mmlu_{code}", 5), (f"hellaswag_{code}", 0), (f"arc_{code}", 0))
       for name, code in _LANGS.items()},
    "report-eng": (("mmlu", 5), ("hellaswag", 0), ("arc_challenge", 0)),
    "nesso": (("ifeval", 0), ("arc_challenge", 0), ("hellaswag", 0), ("mmlu", 5),
              ("zagreus_ifeval_ita", 0), ("arc_it", 0), ("hellaswag_it", 0), ("m_mmlu_it", 5)),
    "evalita-mp": (("evalita-mp", None),),
    "pt-leaderboard": (("zagreus_assin2_rte", 15), ("zagreus_assin2_sts", 15), ("zagreus_bluex", 3),
                       ("zagreus_enem_challenge", 3), ("zagreus_faquad_nli", 15), ("zagreus_hatebr_offensive", 25),
                       ("zagreus_oab_exams", 3), ("zagreus_portuguese_hate_speech", 25), ("zagreus_tweetsentbr", 25)),
}

# The report's names of tasks that lm-eval 0.4.13 does not ship, and the shipped task defining each.
ALIASES = {"ifeval-ita": "zagreus_ifeval_ita",
           **{n: f"zagreus_{n}" for n in ("enem_challenge", "bluex", "oab_exams", "faquad_nli", "hatebr_offensive",
                                          "portuguese_hate_speech", "tweetsentbr")}}


def suite_names() -> list[str]:
    """Every suite name, with the offline flavours that exist."""
    return list(SUITES) + [n + OFFLINE for n in SUITES if _has_offline_flavour(n)]


def _without_twin(suite: str) -> list[str]:
    return [t for t, _ in SUITES[suite] if not t.startswith("zagreus_") and offline_alternative(t) is None]


def _has_offline_flavour(suite: str) -> bool:
    # Some task swaps to its twin, and every one has a local form (the shipped tasks have).
    return not _without_twin(suite) and any(not t.startswith("zagreus_") for t, _ in SUITES[suite])


def suite_tasks(name: str) -> list[tuple[str, int | None]]:
    """(task, num_fewshot) of a suite or its offline flavour; UserError for an offline flavour that has none."""
    base = name.removesuffix(OFFLINE) if name.endswith(OFFLINE) else name
    tasks = list(SUITES[base])
    if base == name:
        return tasks
    if not _has_offline_flavour(base):
        offline = ", ".join(n for n in suite_names() if n.endswith(OFFLINE))
        missing = _without_twin(base)
        why = (f"{', '.join(missing)} ship no offline twin" if missing
               else "its tasks read --data-dir already, when it holds their files")
        raise UserError(f"suite {base} has no offline flavour: {why} (offline suites: {offline})")
    return [(t if t.startswith("zagreus_") else offline_alternative(t), k) for t, k in tasks]


def is_suite(name: str) -> bool:
    return name in SUITES or (name.endswith(OFFLINE) and name.removesuffix(OFFLINE) in SUITES)


def expand(names: list[str], num_fewshot: int | dict[str, int] | None = None
           ) -> tuple[list[str], int | dict[str, int] | None]:
    """(tasks, num_fewshot) with every suite replaced by its tasks and report aliases by their task.

    num_fewshot: one number still applies to every task, suites included (the user's override);
    a mapping, or None, is laid over the suites' counts (a task named in the mapping keeps that
    count). A task named twice runs once, with the count of its first mention.
    """
    tasks: list[str] = []
    counts: dict[str, int] = {}
    any_suite = False
    for name in names:
        if is_suite(name):
            any_suite = True
            members = suite_tasks(name)
        else:
            members = [(ALIASES.get(name, name), None)]
        for task, k in members:
            if task in tasks:
                continue
            tasks.append(task)
            if k is not None:
                counts[task] = k
    if num_fewshot is None and not any_suite or isinstance(num_fewshot, int):
        return tasks, num_fewshot
    given = {ALIASES.get(t, t): k for t, k in (num_fewshot or {}).items()}
    return tasks, {**counts, **given}
