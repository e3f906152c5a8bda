"""Fine-tuned models into this server's registry: every model that a job of any training process
sharing the store made, registered under its `fine_tuned_model` name within a second of its
job's success, or at once when a request names one not registered yet."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from ..adapter_file import CONFIG, TENSORS
from ..atomic import write_folder
from ..config import TiedLoraError
from ..serve.registry import Taken
from .store import Store


class Publisher:
    def __init__(self, store: Store, engine, folder: Path, every: float = 1.0):
        self.store, self.engine, self.folder, self.every = store, engine, folder, every
        self.seq = 0  # the store's models up to this one are registered
        self.lock = threading.Lock()

    def sync(self) -> None:
        """Register the models made since the last call (a blocking call: off the event loop)."""
        with self.lock:
            for row in self.store.models_after(self.seq):
                folder = self.folder / row["job_id"]
                if not folder.is_dir():
                    write_folder(folder, {TENSORS: row["tensors"], CONFIG: row["config"].encode("utf-8")})
                try:
                    self.engine.change(lambda n=row["name"], f=folder: self.engine.registry.register(n, f)).result(60)
                except Taken:
                    pass
                except TiedLoraError as e:
                    print(f"tiedlora serve: cannot serve {row['name']}: {e}", file=sys.stderr)
                self.seq = row["seq"]

    def keep(self, stop: threading.Event) -> None:
        while not stop.wait(self.every):
            try:
                self.sync()
            except Exception as e:  # the database away for a moment: try again
                print(f"tiedlora serve: the store did not answer ({type(e).__name__}: {e})", file=sys.stderr)
