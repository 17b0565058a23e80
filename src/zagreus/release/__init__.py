"""Export and release: Hugging Face folders of saved models (`export`), the model card built from
the run's records (`card`), and the release folder with its optional hub upload (`publish`)."""
