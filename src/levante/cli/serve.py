"""Talking to a model: `levante serve` (OpenAI-compatible HTTP API + chat page), `levante chat` (terminal)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from levante.cli.common import err_console
from levante.errors import LevanteError

CHECKPOINT_HELP = "Checkpoint directory, run directory or HF DeepseekV3 dir."
DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N."
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    checkpoint: Path = typer.Argument(..., help=CHECKPOINT_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to bind; loopback unless you say otherwise."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: str = typer.Option(None, "--api-key", envvar="LEVANTE_API_KEY",
                                help="Require 'Authorization: Bearer KEY' on every route but /health."),
    max_batch: int = typer.Option(16, help="Batch slots in the latent cache (requests decoded together)."),
    max_tokens: int = typer.Option(1024, help="Most new tokens one request may ask for."),
    max_concurrent: int = typer.Option(128, help="Requests in flight (running + queued); more get 429."),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest request body accepted."),
    speculative: bool = typer.Option(False, help="MTP self-speculative decoding (model must have MTP)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decode step: ~2x faster decoding "
                                 "once built (the first requests wait tens of seconds for it)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
):
    """Serve a checkpoint over an OpenAI-compatible API, with a chat page at /."""
    if not 0 < port < 65536:
        raise LevanteError(f"--port must be in 1..65535, got {port}")
    for name, v in (("--max-batch", max_batch), ("--max-tokens", max_tokens), ("--max-concurrent", max_concurrent),
                    ("--max-body-bytes", max_body_bytes)):
        if v < 1:
            raise LevanteError(f"{name} must be >= 1, got {v}")
    import uvicorn

    from levante.infer.batch import Engine
    from levante.infer.load import load_for_inference
    from levante.infer.server import Limits, create_app

    model, tokenizer, path = load_for_inference(checkpoint, device=device)
    engine = Engine(model, tokenizer, max_batch=max_batch, speculative=speculative, compile=compile).start()
    limits = Limits(max_tokens=max_tokens, max_concurrent=max_concurrent, max_body_bytes=max_body_bytes)
    app = create_app(engine, model_name=Path(checkpoint).name or path.name, api_key=api_key, limits=limits)
    if host not in LOOPBACK and api_key is None:
        err_console.print(f"[yellow]warning:[/yellow] serving on {host} without --api-key: anyone who can reach "
                          "this address can use the model")
    err_console.print(f"serving {path} on http://{host}:{port} (chat page at /)")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        engine.stop()


def chat(
    checkpoint: Path = typer.Argument(..., help=CHECKPOINT_HELP),
    temperature: float = typer.Option(0.7, help="0 for greedy decoding; /temp X changes it."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most new tokens per answer."),
    system: str = typer.Option(None, help="A system message that opens the conversation."),
    seed: int = typer.Option(None, help="Seed for reproducible sampling."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
):
    """Chat in the terminal: streamed answers, history kept; /reset, /temp X, /quit."""
    from levante.infer.batch import Engine
    from levante.infer.engine import SamplingParams
    from levante.infer.load import load_for_inference
    from levante.tokenizer.chat import render_chat

    if max_tokens < 1:
        raise LevanteError(f"--max-tokens must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise LevanteError(f"--temperature must be >= 0, got {temperature}")
    model, tokenizer, _ = load_for_inference(checkpoint, device=device)
    engine = Engine(model, tokenizer, max_batch=1)
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    interactive = sys.stdin.isatty()
    out = sys.stdout
    out.write("Levante chat: /reset starts over, /temp X sets the temperature, /quit leaves.\n")
    while True:
        if interactive:
            out.write("> ")
        out.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            history = list(opening)
            out.write("(conversation cleared)\n")
            continue
        if text.startswith("/temp"):
            try:
                value = float(text.split(maxsplit=1)[1])
                if value < 0:
                    raise ValueError
            except (IndexError, ValueError):
                out.write("(usage: /temp X with X >= 0)\n")
                continue
            temperature = value
            out.write(f"(temperature {temperature})\n")
            continue
        if text.startswith("/"):
            out.write(f"(unknown command {text.split()[0]}; /reset, /temp X, /quit)\n")
            continue
        history.append({"role": "user", "content": text})
        ids = render_chat(tokenizer, history)
        room = engine.max_len - len(ids)
        if room < 1:
            history.pop()
            out.write("(the conversation is longer than the model's context: /reset to start over)\n")
            continue
        params = SamplingParams(max_new_tokens=min(max_tokens, room), temperature=temperature, seed=seed)
        answer = []
        for delta in engine.submit(ids, params, stop_ids={tokenizer.end_id, tokenizer.eos_id}):
            answer.append(delta.text)
            out.write(delta.text)
            out.flush()
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(chat)
