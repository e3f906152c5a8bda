"""`tiedlora serve`: the base model, the adapters found under a folder, the engine and the app,
put together and run by uvicorn."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from ..config import TiedLoraError
from ..models import load_model
from ..runs import discover
from .engine import Engine
from .multi import MultiAdapterModel


def build(model: str, adapters, max_batch: int = 32, max_prompt_tokens: int = 2048, max_tokens_limit: int = 1024):
    """(engine, app): the base model, every adapter found under `adapters`, the worker started.
    A folder that cannot be served is reported and skipped."""
    from .app import Served, create_app

    root = Path(adapters)
    if not root.is_dir():
        raise TiedLoraError(
            f"--adapters {adapters}: no such folder; pass the folder of run or adapter folders to serve."
        )
    if min(max_batch, max_prompt_tokens, max_tokens_limit) < 1:
        raise TiedLoraError("--max_batch, --max_prompt_tokens and --max_tokens_limit must be at least 1.")
    lm, tokenizer = load_model(model)
    engine = Engine(MultiAdapterModel(lm), tokenizer, max_batch)
    found, refused = discover(root)
    for name, folder in found.items():
        try:
            engine.add(name, folder)
        except TiedLoraError as e:
            refused[name] = str(e)
    for name, why in refused.items():
        print(f"tiedlora serve: skipped {name}: {why}", file=sys.stderr)
    return engine, create_app(Served(engine, tokenizer, model, root, max_prompt_tokens, max_tokens_limit))


def serve(
    model: str, adapters, host: str, port: int, max_batch: int, max_prompt_tokens: int, max_tokens_limit: int
) -> None:
    """Serve until interrupted. The socket is bound before the line that names the address is
    printed, so `--port 0` (any free port) prints the port it got, with no race for it."""
    import uvicorn

    engine, app = build(model, adapters, max_batch, max_prompt_tokens, max_tokens_limit)
    try:
        sock = socket.create_server((host, port))
    except OSError as e:
        raise TiedLoraError(
            f"Cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host."
        ) from None
    bound = sock.getsockname()[1]
    print(
        f"tiedlora serve: {model} with {len(engine.adapters)} adapters {engine.adapters} on http://{host}:{bound}/v1",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    engine.close()
