"""The Llama-3.2-style model: shapes and presets (config), the module (llama), the Hugging Face
folder format (hf), the incremental decoder (generate) and the `zagreus model` verbs (commands).

Nothing is imported here: `zagreus --help` loads model/commands.py, which must not pull in torch.
"""
