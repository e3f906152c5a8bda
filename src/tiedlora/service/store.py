"""The fine-tuning service's state, in a SQL database through SQLAlchemy: a SQLite file under
`--state DIR` by default (nothing to install), or any SQLAlchemy URL (`--store`, e.g. PostgreSQL)
that several servers share. Files keep their content in the database, so every server and worker
sharing it reads the same bytes. Every query names the tenant: another tenant's row is, to a
caller, a row that does not exist.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    func,
    insert,
    select,
)
from sqlalchemy.engine import Engine

from ..config import TiedLoraError

metadata = MetaData()

files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(64), nullable=False, index=True),  # "" for the administrator
    Column("filename", String(255), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("rows", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("content", LargeBinary, nullable=False),
)

FILE_FIELDS = ("id", "tenant", "filename", "purpose", "bytes", "rows", "created_at")


def new_id(prefix: str) -> str:
    """OpenAI's id shape: a prefix and random characters (unguessable, so ids say nothing)."""
    return f"{prefix}-{secrets.token_hex(12)}"


class Store:
    """The database and the queries the service makes of it."""

    def __init__(self, url: str):
        self.url = url
        try:
            self.engine: Engine = create_engine(url)
            metadata.create_all(self.engine)
        except Exception as e:  # a bad URL or an unreachable database: SQLAlchemy raises many kinds
            raise TiedLoraError(f"--store {safe_url(url)}: cannot open the database ({type(e).__name__}).") from None

    @classmethod
    def open(cls, state: str | Path, url: str | None = None) -> Store:
        """`url`, or a SQLite file in the folder `state` (created)."""
        if url is None:
            folder = Path(state)
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TiedLoraError(f"--state {folder}: cannot create it ({e.strerror or e}).") from None
            url = f"sqlite:///{folder.resolve() / 'tiedlora.db'}"
        return cls(url)

    def add_file(self, tenant: str, filename: str, purpose: str, content: bytes, rows: int) -> dict:
        row = dict(id=new_id("file"), tenant=tenant, filename=filename, purpose=purpose, bytes=len(content))
        row.update(rows=rows, created_at=int(time.time()), content=content)
        with self.engine.begin() as db:  # one transaction: the file is there whole, or not at all
            db.execute(insert(files).values(**row))
        return {k: row[k] for k in FILE_FIELDS}

    def file(self, tenant: str, file_id: str, content: bool = False) -> dict | None:
        columns = [files.c[k] for k in FILE_FIELDS] + ([files.c.content] if content else [])
        with self.engine.connect() as db:
            found = db.execute(select(*columns).where(files.c.id == file_id, files.c.tenant == tenant)).first()
        return dict(found._mapping) if found is not None else None

    def files(self, tenant: str, purpose: str | None = None) -> list[dict]:
        query = select(*[files.c[k] for k in FILE_FIELDS]).where(files.c.tenant == tenant)
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        with self.engine.connect() as db:
            return [dict(r._mapping) for r in db.execute(query.order_by(files.c.created_at.desc(), files.c.id))]

    def tenant_bytes(self, tenant: str) -> int:

        with self.engine.connect() as db:
            return int(
                db.execute(
                    select(func.coalesce(func.sum(files.c.bytes), 0)).where(files.c.tenant == tenant)
                ).scalar_one()
            )

    def delete_file(self, tenant: str, file_id: str) -> bool:
        with self.engine.begin() as db:
            return db.execute(delete(files).where(files.c.id == file_id, files.c.tenant == tenant)).rowcount > 0


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(an unreadable URL)"
