"""`tiedlora serve --state DIR`: the server of `serve.server`, its app extended with the
service's endpoints (files, fine-tuning jobs), its store, the training processes beside it and
the publisher that serves what they make."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

from ..serve.config import ServeConfig
from ..serve.server import build_from
from . import files, jobs
from .publish import Publisher
from .store import Store
from .training import TrainingProcesses

STATE = "tiedlora-state"  # the state folder when only --store is given: run folders and the adapters made


def build(config: ServeConfig) -> tuple[Any, Any]:
    """(engine, app) as `build_from` makes them, with the fine-tuning service when
    `config.state` or `config.store` is set; its training processes start and stop with the app."""
    if config.state is None and config.store is None:
        return build_from(config)
    state = Path(config.state or STATE)
    store = Store.open(state, config.store)
    engine, app = build_from(config)
    served = app.state.served
    app.state.store = store
    app.include_router(files.router)
    app.include_router(jobs.router)
    publisher = Publisher(store, engine, state / "models")
    served.refresh = publisher.sync
    training = TrainingProcesses(config, store, state, served.model_name)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        stop = threading.Event()
        keeper = threading.Thread(target=publisher.keep, args=(stop,), daemon=True, name="tiedlora-publish")
        keeper.start()
        training.start()
        try:
            yield
        finally:
            stop.set()
            training.close()
            keeper.join(10)

    app.router.lifespan_context = lifespan
    return engine, app
