"""`tiedlora serve`: the base model, the adapters registered from a folder, the engine and the
app, put together and run by uvicorn."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from ..config import TiedLoraError
from ..models import load_model
from ..runs import discover
from .engine import Engine
from .multi import MultiAdapterModel


def build(
    model: str,
    adapters,
    max_batch: int = 32,
    max_prompt_tokens: int = 2048,
    max_tokens_limit: int = 1024,
    max_resident: int = 512,
    prefill_tokens: int = 256,
    max_request_bytes: int = 1 << 20,
    max_rank: int = 64,
    pin: list[str] | None = None,
):
    """(engine, app): the base model, every adapter folder under `adapters` registered (not
    read: each is read on its first request, or now if pinned), the worker started. A folder
    that cannot be served is reported and skipped; without the folder, the base model is served
    alone and adapters put there later can be loaded at run time."""
    from .app import Served, create_app

    root = Path(adapters)
    limits = dict(max_batch=max_batch, max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit)
    limits.update(max_resident=max_resident, prefill_tokens=prefill_tokens, max_request_bytes=max_request_bytes)
    if min(*limits.values(), max_rank) < 1:
        raise TiedLoraError(f"--{', --'.join(limits)} and --max_rank must be at least 1.")
    lm, tokenizer = load_model(model)
    multi = MultiAdapterModel(lm, max_rank=max_rank)
    engine = Engine(multi, tokenizer, max_batch, max_resident, prefill_tokens)
    found, refused = discover(root)
    if not root.is_dir():
        print(
            f"tiedlora serve: no folder {root}: serving {model} alone; adapters put there can be loaded at run time.",
            file=sys.stderr,
        )
    for name, folder in found.items():
        try:
            engine.add(name, folder, pin=name in (pin or []))
        except TiedLoraError as e:
            refused[name] = str(e)
    for name in set(pin or []) - set(found):
        refused[name] = "--pin names an adapter that is not under --adapters."
    for name, why in refused.items():  # a folder name may not be valid Unicode: escape it
        line = f"tiedlora serve: skipped {name}: {why}"
        print(line.encode("utf-8", "backslashreplace").decode(), file=sys.stderr)
    context = getattr(lm.config, "max_position_embeddings", None)
    served = Served(engine, tokenizer, model, root, context, max_prompt_tokens, max_tokens_limit, max_request_bytes)
    return engine, create_app(served)


def serve(model: str, adapters, host: str, port: int, **limits) -> None:
    """Serve until interrupted. The socket is bound before the line that names the address is
    printed, so `--port 0` (any free port) prints the port it got, with no race for it."""
    import uvicorn

    engine, app = build(model, adapters, **limits)
    try:
        sock = socket.create_server((host, port))
    except OSError as e:
        raise TiedLoraError(
            f"Cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host."
        ) from None
    bound = sock.getsockname()[1]
    print(
        f"tiedlora serve: {model} with {len(engine.adapters)} adapters on http://{host}:{bound}/v1",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    engine.close()
