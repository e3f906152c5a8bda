"""Who is asking: the administrator's key (`--api_key`) and the tenants' keys (`--tenants`).

Keys are kept only as SHA-256 digests; a presented key is hashed and compared with every digest
in constant time (`hmac.compare_digest`, no early exit), so neither its content nor which tenant
holds a near miss leaks through timing. Keys are never logged. A tenant sees the base model and
the adapters registered under `<adapters>/<tenant>/` (named `<tenant>/<name>`); anything else
is, to it, a name that does not exist.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import TiedLoraError
from ..runs import NAME

DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class Caller:
    """An authorised request's caller: a tenant, or (tenant None) the administrator, which is
    everyone on a server without keys."""

    tenant: str | None = None

    @property
    def admin(self) -> bool:
        return self.tenant is None

    def sees(self, name: str, base: str) -> bool:
        """May this caller use or even learn of model `name`? Its own are its adapters'
        folder and the models its fine-tuning jobs made (OpenAI's `ft:<base>:<tenant>:...`)."""
        return self.admin or name == base or name.startswith((f"{self.tenant}/", f"ft:{base}:{self.tenant}:"))


ADMIN = Caller()


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def stored_digest(key: str) -> str:
    """A key as the tenants file gives it: `sha256:<hex>` (its digest), or the key itself."""
    found = DIGEST.fullmatch(key)
    return found.group(1) if found else digest(key)


class Keys:
    """Digests of the administrator's key and of each tenant's keys."""

    def __init__(self, admin: str | None, tenants: dict[str, list[str]]):
        self.entries: list[tuple[str, Caller]] = []  # (digest, who holds it)
        if admin:
            self.entries.append((digest(admin), ADMIN))
        for tenant, keys in tenants.items():
            self.entries += [(stored_digest(key), Caller(tenant)) for key in keys]

    @classmethod
    def from_options(cls, api_key: str | None, tenants_file: str | None) -> Keys | None:
        """The server's keys, or None for a server open to anyone who reaches it."""
        if not api_key and tenants_file is None:
            return None
        keys = cls(api_key, read_tenants(Path(tenants_file)) if tenants_file is not None else {})
        if api_key and sum(stored == digest(api_key) for stored, _ in keys.entries) > 1:
            raise TiedLoraError(
                "--api_key is also a tenant's key in --tenants: give the administrator a key of its own."
            )
        return keys

    def caller(self, authorization: str | None) -> Caller | None:
        """Who sent `Authorization: Bearer KEY`; None if nobody known."""
        scheme, _, key = (authorization or "").partition(" ")
        presented = digest(key.strip()) if scheme.lower() == "bearer" and key.strip() else ""
        who = None
        for stored, holder in self.entries:  # every entry compared: the time does not depend on which matched
            if hmac.compare_digest(presented, stored):
                who = holder
        return who


def read_tenants(path: Path) -> dict[str, list[str]]:
    """`{"acme": ["key-1", "sha256:<hex>"], ...}`, every name and key checked."""
    try:
        tenants = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TiedLoraError(f"--tenants {path}: cannot read it as JSON ({e}).") from None
    example = '{"acme": ["a-long-random-key", "sha256:<64 hex digits>"]}'
    if not isinstance(tenants, dict):
        raise TiedLoraError(f"--tenants {path} must hold a JSON object of tenant names to key lists, e.g. {example}.")
    seen: dict[str, str] = {}
    for tenant, keys in tenants.items():
        if not NAME.fullmatch(tenant):
            raise TiedLoraError(
                f"--tenants {path}: tenant {tenant[:64]!r} must be a folder name (letters, digits, '.', '_', '-')."
            )
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k.strip() for k in keys):
            raise TiedLoraError(f"--tenants {path}: {tenant!r} needs a non-empty list of keys, e.g. {example}.")
        for n, key in enumerate(keys):
            if key.startswith("sha256:") and not DIGEST.fullmatch(key):
                raise TiedLoraError(
                    f"--tenants {path}: key {n} of {tenant!r} is not sha256: and 64 lowercase hex digits."
                )
            held = DIGEST.fullmatch(key).group(1) if DIGEST.fullmatch(key) else digest(key)  # type: ignore[union-attr]
            if held in seen and seen[held] != tenant:
                raise TiedLoraError(
                    f"--tenants {path}: key {n} of {tenant!r} is also {seen[held]!r}'s; keys are unique."
                )
            seen[held] = tenant
    return tenants
