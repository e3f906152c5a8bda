"""Every adapter the server knows, and which of them are loaded in the model.

Registering reads and checks only an adapter's config (a few hundred bytes: its base model,
rank and shapes), so ten thousand adapters are ready in seconds. Its tensors are read on its
first request (by `adapter_file.read_adapter`, the same checks as `tiedlora.load`); at most
`max_resident` are loaded at once, and loading one more evicts the least recently used that no
running row needs and that is not pinned. A folder that fails its checks is reported and
dropped from the registry; the others go on.

Only the engine's worker changes a registry or reads its working state: every change reaches it
through the engine's inbox. Any other thread (the event loop's handlers) reads `view`, an
immutable snapshot of the names, their folders and the refused ones, replaced whole after every
change, so a reader sees one consistent state and never a dict that changes under it.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from ..adapter_file import AdapterFile, read_adapter
from ..config import TiedLoraError
from ..multi import MultiAdapterModel
from .metrics import Metrics


class Full(Exception):
    """Every resident adapter is pinned or in use: the request waits for a row to finish."""


class Taken(TiedLoraError):
    """The name is already registered."""


@dataclass(frozen=True)
class View:
    """The registry as readers on other threads see it: the registered adapters' folders, in
    registration order, and why refused names were dropped, both read-only."""

    folders: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}))
    refused: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def names(self) -> list[str]:
        return list(self.folders)


class Registry:
    def __init__(self, multi: MultiAdapterModel, max_resident: int, metrics: Metrics):
        if max_resident < 1:
            raise TiedLoraError(f"max_resident is {max_resident}; at least one adapter must fit.")
        self.multi, self.max_resident, self.metrics = multi, max_resident, metrics
        self.folders: dict[str, Path] = {}
        self.pinned: set[str] = set()
        self.refused: dict[str, str] = {}  # name -> why its folder was dropped
        self.users: Counter[str] = Counter()  # rows in flight per adapter
        self.recent: OrderedDict[str, None] = OrderedDict()  # resident adapters, least recently used first
        self.view = View()

    def publish(self) -> None:
        """Replace `view` with a snapshot of the state now (one reference assignment: a reader
        has the old snapshot or the new one, each whole)."""
        self.view = View(MappingProxyType(dict(self.folders)), MappingProxyType(dict(self.refused)))
        self.metrics.registered.set(len(self.folders))

    def register(self, name: str, folder: Path, adapter: AdapterFile | None = None, pin: bool = False) -> None:
        """Know `name` from now on, its config checked; with `adapter` (already read) or `pin` it
        is loaded now."""
        try:
            self._add(name, folder, adapter, pin)
        finally:
            self.publish()

    def register_all(self, folders: Mapping[str, Path], pin: list[str]) -> dict[str, str]:
        """Register many at once (start-up), published once; why each refused one was refused."""
        refused = {}
        try:
            for name, folder in folders.items():
                try:
                    self._add(name, folder, pin=name in pin)
                except TiedLoraError as e:
                    refused[name] = named(e, name, folder)
        finally:
            self.publish()
        return refused

    def _add(self, name: str, folder: Path, adapter: AdapterFile | None = None, pin: bool = False) -> None:
        """`register` without publishing."""
        check_name(name)
        if name in self.folders:
            raise Taken(f"Adapter name {name!r} is taken; unload it first or pick another name.")
        self.multi.check(adapter if adapter is not None else read_adapter(folder, tensors=False))
        self.folders[name] = Path(folder)
        self.refused.pop(name, None)
        if pin:
            if len(self.pinned) >= self.max_resident - 1:
                self.folders.pop(name)
                raise TiedLoraError(
                    f"{len(self.pinned)} adapters are pinned already: at most max_resident - 1 "
                    f"({self.max_resident - 1}) may be, so that one place is left for every other adapter; "
                    "unpin one, or serve with a larger --max_resident."
                )
            self.pinned.add(name)
        if adapter is not None or pin:
            try:
                self.load(name, adapter)
            except (TiedLoraError, Full):
                self.folders.pop(name)
                self.pinned.discard(name)
                raise

    def unregister(self, name: str) -> None:
        """Forget `name`; if rows still use it, it is unloaded when the last one finishes."""
        if name not in self.folders:
            raise TiedLoraError(f"No adapter named {name!r} is registered; GET /v1/models lists them.")
        del self.folders[name]
        self.pinned.discard(name)
        if not self.users[name]:
            self.evict(name)
        self.publish()

    def acquire(self, name: str) -> int:
        """The model's id for `name`, loading it first if it is not resident; one more user."""
        if name not in self.folders:
            why = self.refused.get(name)
            raise TiedLoraError(
                f"Adapter {name!r} cannot be served: {why}" if why else f"Adapter {name!r} is not registered."
            )
        if name not in self.recent:
            try:
                self.load(name)
            except TiedLoraError as e:
                self.refused[name] = why = named(e, name, self.folders[name])
                del self.folders[name]
                self.pinned.discard(name)
                self.publish()
                raise TiedLoraError(why) from None
        self.recent.move_to_end(name)
        self.users[name] += 1
        return self.multi.id_of(name)

    def release(self, name: str) -> None:
        self.users[name] -= 1
        if not self.users[name]:
            del self.users[name]
            if name not in self.folders:  # unregistered while in use
                self.evict(name)

    def load(self, name: str, adapter: AdapterFile | None = None) -> None:
        if len(self.recent) >= self.max_resident:
            idle = next((n for n in self.recent if not self.users[n] and n not in self.pinned), None)
            if idle is None:
                raise Full(name)
            self.evict(idle)
            self.metrics.evictions.inc()
        self.multi.put(name, adapter if adapter is not None else read_adapter(self.folders[name]))
        self.recent[name] = None
        self.metrics.loads.inc()
        self.metrics.resident.set(len(self.recent))

    def evict(self, name: str) -> None:
        if name in self.recent:
            del self.recent[name]
            self.multi.remove(name)
            self.metrics.resident.set(len(self.recent))


def named(error: Exception, name: str, folder: Path) -> str:
    """Why adapter `name` cannot be served, as a client may read it: its folder (a path on the
    server) named by the adapter's name instead."""
    text = str(error)
    for path in sorted({str(folder), str(Path(folder).resolve())}, key=len, reverse=True):
        text = text.replace(path, name)
    return text


def check_name(name: str) -> None:
    """A name clients can send and read back: not empty, printable (a newline or another control
    character makes a name nobody can fetch or delete by URL), valid Unicode, not absurdly long."""
    if not name or not name.strip() or len(name) > 256:
        raise TiedLoraError(f"Adapter name {name[:40]!r} must be 1 to 256 characters, not all spaces.")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise TiedLoraError(
            f"Adapter name {name!r} is not valid Unicode (a folder name that is not UTF-8?); rename it."
        ) from None
    if not name.isprintable():
        raise TiedLoraError(
            f"Adapter name {name[:40]!r} holds a control character (a newline, a tab, ...); use printable characters."
        )
