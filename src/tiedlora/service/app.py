"""`tiedlora serve --state DIR`: the server of `serve.server`, its app extended with the
service's endpoints and store."""

from __future__ import annotations

from typing import Any

from ..serve.config import ServeConfig
from ..serve.server import build_from
from . import files
from .store import Store


def build(config: ServeConfig) -> tuple[Any, Any]:
    """(engine, app) as `build_from` makes them, with the files API when `config.state` or
    `config.store` is set."""
    keeps = config.state is not None or config.store is not None
    store = Store.open(config.state or "tiedlora-state", config.store) if keeps else None
    engine, app = build_from(config)
    if store is not None:
        app.state.store = store
        app.include_router(files.router)
    return engine, app
