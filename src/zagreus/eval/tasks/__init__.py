"""lm-eval task definitions shipped with zagreus (YAML + the modules their `!function`s name).

- Offline twins, read from local files only: each `zagreus_*` okapi/English task copies the prompt,
  choices and metrics of the lm-eval task it mirrors (the okapi `arc_xx`, `hellaswag_xx`, `m_mmlu_xx`,
  and English `hellaswag`, `arc_challenge`); `data_files` names are relative and are joined to
  `--data-dir` at run time (`utils.py`).
- Tasks lm-eval 0.4.13 lacks, read from the hub or from local files: the Open Portuguese LLM
  Leaderboard's nine (`pt_leaderboard.py`, after eduagarcia/lm-evaluation-harness-pt) and ifeval-ita
  (mii-llm/ifeval-ita, scored by lm-eval's IFEval checkers). `metadata.local_files` names the files
  that, all present in `--data-dir`, replace the hub dataset.
"""
