"""`tiedlora serve`: the base model, the adapters registered from a folder, the engine and the
app, put together and run by uvicorn."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Any

from ..config import TiedLoraError
from ..models import load_model
from ..multi import MultiAdapterModel
from ..quantize import quantize
from ..runs import discover
from .config import ServeConfig
from .engine import Engine
from .keys import Keys


def build(model: str, adapters: str | Path, **options: Any) -> tuple[Engine, Any]:
    """(engine, app): the base model, every adapter folder under `adapters` registered (not
    read: each is read on its first request, or now if pinned), the worker started; `options`
    are `ServeConfig`'s. A folder that cannot be served is reported and skipped; without the
    folder, the base model is served alone and adapters put there later can be loaded at run time."""
    return build_from(ServeConfig(model=model, adapters=str(adapters), **options))


def build_from(config: ServeConfig) -> tuple[Engine, Any]:
    """`build` from a whole `ServeConfig`."""
    from .app import Served, create_app

    root, pin = Path(config.adapters), config.pin or []
    keys = Keys.from_options(config.api_key or os.environ.get("TIEDLORA_API_KEY"), config.tenants)
    device, dtype = config.placement()
    lm, tokenizer = load_model(config.model, dtype=dtype)
    lm = lm.to(device)
    if config.quantize is not None:  # on the device: bitsandbytes quantizes where the weights are
        quantize(lm, config.quantize)
    multi = MultiAdapterModel(lm, dtype=dtype, max_rank=config.max_rank)
    engine = Engine(multi, tokenizer, config)
    found, refused = discover(root)
    if not root.is_dir():
        print(
            f"tiedlora serve: no folder {root}: serving {config.model_id} alone; adapters put there can be loaded at "
            "run time.",
            file=sys.stderr,
        )
    refused.update(engine.add_all(found, pin))
    for name in set(pin) - set(found):
        refused[name] = "--pin names an adapter that is not under --adapters."
    for name, why in refused.items():  # a folder name may not be valid Unicode: escape it
        line = f"tiedlora serve: skipped {name}: {why}"
        print(line.encode("utf-8", "backslashreplace").decode(), file=sys.stderr)
    context = getattr(lm.config, "max_position_embeddings", None)
    return engine, create_app(Served(engine, tokenizer, config.model_id, root, context, config, keys))


def serve(config: ServeConfig, builder=build_from) -> None:
    """Serve until interrupted, the (engine, app) that `builder` makes of `config`. The socket is
    bound before the line that names the address is printed, so `--port 0` (any free port)
    prints the port it got, with no race for it."""
    import uvicorn

    engine, app = builder(config)
    host, port = config.host, config.port
    try:
        sock = socket.create_server((host, port))
    except OSError as e:
        raise TiedLoraError(
            f"Cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host."
        ) from None
    bound = sock.getsockname()[1]
    warning = open_warning(app.state.served.keys is not None, host, bound)
    if warning is not None:
        print(warning, file=sys.stderr)
    print(
        f"tiedlora serve: {config.model_id} with {len(engine.adapters)} adapters on http://{host}:{bound}/v1",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    engine.close()


def open_warning(keyed: bool, host: str, port: int) -> str | None:
    """The line said at start by a server without keys that listens beyond loopback."""
    if keyed or loopback(host):
        return None
    who = f"anyone who reaches {host}:{port}"
    return f"tiedlora serve: no --api_key or --tenants: {who} can use, load and unload every adapter."


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
