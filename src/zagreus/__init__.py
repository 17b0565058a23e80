"""zagreus: train small bilingual language models from scratch, end to end."""

__version__ = "0.1.0"
