"""Offline lm-eval task definitions shipped with zagreus (YAML + utils), read from local files.

Each `zagreus_*` task copies the prompt, choices and metrics of the lm-eval task it mirrors
(the okapi `arc_xx`, `hellaswag_xx`, `m_mmlu_xx`, and English `hellaswag`, `arc_challenge`);
`data_files` names are relative and are joined to `--data-dir` at run time.
"""
