"""Post-training: chat templates (chat.py), supervised fine-tuning (sft.py), DPO (dpo.py)."""
