"""Using a model: the terminal chat (`zagreus chat`) and the OpenAI-compatible server with its
web chat page (`zagreus serve`), both on the engine in zagreus.serve.engine."""
