"""CLI verbs of the serving stage: `zagreus chat MODEL` and `zagreus serve MODEL`."""

from __future__ import annotations

# Only typer, zagreus.errors and the standard library at module level, so `zagreus --help` stays
# fast; each verb imports the code it runs (torch and the server load inside them).
import ipaddress
import json
from pathlib import Path
from typing import Optional

import typer

from zagreus.errors import UserError

MODEL_HELP = "export folder, checkpoint folder or run directory"
TEMPLATE_HELP = "chat template (chatml or llama3); default: the export's chat_template, else chatml"
DEVICE_HELP = "cpu, cuda, cuda:N, or auto (cuda when available)"
GGUF_HELP = ("run this GGUF file through llama.cpp (needs llama-cpp-python) instead of MODEL's weights; "
             "MODEL, its export or release folder, gives the tokenizer and chat template; one request at a time")


def _device(name: str) -> str:
    from zagreus.devices import pick_device

    return str(pick_device(name))


def _load_tools(path: Optional[Path]) -> list[dict] | None:
    if path is None:
        return None
    if not path.is_file():
        raise UserError(f"--tools {path}: no such file; pass a JSON list of tool schemas")
    try:
        tools = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"--tools {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise UserError(f"--tools {path}: expected a JSON list of tool objects")
    return tools


def _engine(model: Path, gguf: Optional[Path], device: str, **options):
    """Our model on `device`, or with --gguf that file run by llama.cpp."""
    if gguf is not None:
        from zagreus.serve.llama_cpp import open_gguf_engine

        options.pop("max_active", None)  # llama.cpp holds one sequence: requests run one at a time
        return open_gguf_engine(gguf, model, **options)
    from zagreus.serve.engine import open_engine

    return open_engine(model, device=_device(device), **options)


def _loopback(host: str) -> bool:
    """Whether only this machine can reach `host`; a host name other than localhost may resolve anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def chat(model: Path = typer.Argument(..., help=MODEL_HELP),
         template: Optional[str] = typer.Option(None, help=TEMPLATE_HELP),
         system: Optional[str] = typer.Option(None, help="system prompt"),
         tools: Optional[Path] = typer.Option(None, help="JSON file with a list of tool schemas (OpenAI format)"),
         temperature: float = typer.Option(0.7, min=0.0, help="0 means greedy"),
         top_k: int = typer.Option(0, min=0, help="keep the k most likely tokens (0: all)"),
         top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="nucleus sampling mass"),
         repetition_penalty: float = typer.Option(1.0, min=0.01, help="CTRL-style penalty on seen tokens (1: off)"),
         max_tokens: int = typer.Option(512, min=1, help="most tokens per reply (clipped to the context)"),
         seed: Optional[int] = typer.Option(None, help="sampling seed"),
         device: str = typer.Option("auto", help=DEVICE_HELP),
         gguf: Optional[Path] = typer.Option(None, help=GGUF_HELP)) -> None:
    """Chat in the terminal with streamed replies (/reset, /tool TEXT, /exit). Reads stdin, so it can be piped."""
    import sys

    from zagreus.model.generate import SamplingParams
    from zagreus.serve import chat_cli

    tool_list = _load_tools(tools)
    engine = _engine(model, gguf, device, template=template)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, max_new_tokens=max_tokens, seed=seed)
    try:
        chat_cli.run(engine, params, sys.stdin, sys.stdout, system=system, tools=tool_list)
    except KeyboardInterrupt:
        typer.echo("")


def serve(model: Path = typer.Argument(..., help=MODEL_HELP),
          host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 for every interface)"),
          port: int = typer.Option(8000, min=0, max=65535, help="TCP port"),
          template: Optional[str] = typer.Option(None, help=TEMPLATE_HELP),
          name: Optional[str] = typer.Option(None, help="model id reported by /v1/models (default: the folder name)"),
          max_running: int = typer.Option(16, min=1, help="requests generating at once (each holds a KV cache); "
                                                         "the rest wait in arrival order"),
          batch: bool = typer.Option(False, "--batch", help="decode the running requests in one batched forward "
                                                           "(several times the throughput; a reply may then differ "
                                                           "in rare near-ties from the one it gets alone)"),
          device: str = typer.Option("auto", help=DEVICE_HELP),
          api_key: Optional[str] = typer.Option(None, envvar="ZAGREUS_API_KEY",
                                                help="require 'Authorization: Bearer KEY' on /v1/* (401 without it)"),
          insecure: bool = typer.Option(False, "--insecure", help="serve a non-loopback --host without an API key"),
          max_request_bytes: int = typer.Option(1 << 20, min=1, help="largest request body; a larger one gets 413"),
          max_tokens: int = typer.Option(2048, min=1, help="most new tokens per request; a larger max_tokens "
                                                          "is clamped to it"),
          gguf: Optional[Path] = typer.Option(None, help=GGUF_HELP)) -> None:
    """OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health) and a web chat at /."""
    if api_key == "":
        raise UserError("--api-key: empty; pass the key clients must send, or leave the option out")
    if api_key is None and not insecure and not _loopback(host):
        raise UserError(f"--host {host} lets other machines in: pass --api-key KEY (or set ZAGREUS_API_KEY), "
                        "or --insecure to serve without a key")
    from zagreus.serve.server import Limits, serve as run_server

    engine = _engine(model, gguf, device, template=template, name=name, max_active=max_running, batch=batch)
    limits = Limits(max_request_bytes=max_request_bytes, max_tokens=max_tokens, api_key=api_key)
    typer.echo(f"serving {engine.name} on http://{host}:{port}/ (OpenAI API under /v1"
               f"{', API key required' if api_key else ''})")
    run_server(engine, host=host, port=port, limits=limits)


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
    app.command("serve")(serve)
