"""Evaluation: lm-eval integration (the `zagreus` model type, offline task YAMLs), per-checkpoint
progression tables and plots, and model comparisons. See `zagreus eval --help`.

`quick_mc_eval(model, tokenizer, task, limit, data_dir)` (in `zagreus.eval.run`) gives a
multiple-choice score for a model in memory, for use at an interval during pretraining.
"""
