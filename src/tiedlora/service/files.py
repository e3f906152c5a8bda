"""OpenAI's files API (`/v1/files`): fine-tuning data uploaded by a tenant, checked at once with
the row checks of `tiedlora train --data` (a bad row is a 400 naming its line and field, and
nothing is stored), capped per file and per tenant, kept in the store."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response

from ..serve.app import CallerBy
from ..serve.schemas import ApiError
from ..tasks.base import DataError, numbered_lines
from ..tasks.own import FORMS, check_row
from .store import Store

PURPOSES = ("fine-tune",)
FIELDS = {"prompt": "prompt", "completion": "completion", "messages": "messages"}

router = APIRouter()


def store(request: Request) -> Store:
    return request.app.state.store


StoreBy = Annotated[Store, Depends(store)]


def owner(who) -> str:
    return who.tenant or ""  # the administrator's own files


def file_object(row: dict) -> dict:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def check_rows(content: bytes, filename: str) -> int:
    """How many rows; or a 400 naming the first bad line and its field."""
    return len(checked_rows(content, filename))


def checked_rows(content: bytes, filename: str) -> list[dict]:
    """The rows, each checked as `tiedlora train --data` checks it; or a 400 naming the first bad
    line and its field."""
    try:
        numbered = numbered_lines(content, filename, f"expected {FORMS}")
        rows = [check_row(row, FIELDS, f"{filename}, line {n}") for n, row in numbered]
    except DataError as e:
        raise ApiError(400, str(e), "file") from None
    if not rows:
        raise ApiError(400, f"{filename} holds no rows; upload JSON lines of {FORMS}.", "file")
    return rows


@router.post("/v1/files")
async def upload(
    request: Request, who: CallerBy, db: StoreBy, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
):
    if purpose not in PURPOSES:
        raise ApiError(400, f"purpose is {purpose!r}; this server keeps files for fine-tune only.", "purpose")
    served = request.app.state.served
    limit = served.config.max_file_bytes
    content = await file.read(limit + 1)
    if len(content) > limit:
        raise ApiError(413, f"The file is larger than this server's limit of {limit:,} bytes per file; split it.")
    filename = (file.filename or "upload.jsonl")[:255]
    rows = await served.off_loop(check_rows, content, filename)
    quota = served.config.max_tenant_bytes
    if db.tenant_bytes(owner(who)) + len(content) > quota:
        raise ApiError(413, f"Your files would pass this server's limit of {quota:,} bytes; delete some first.")
    return file_object(db.add_file(owner(who), filename, purpose, content, rows))


@router.get("/v1/files")
def list_files(who: CallerBy, db: StoreBy, purpose: str | None = None):
    return {"object": "list", "data": [file_object(r) for r in db.files(owner(who), purpose)], "has_more": False}


def found(db: Store, who, file_id: str, content: bool = False) -> dict:
    row = db.file(owner(who), file_id, content)
    if row is None:
        raise ApiError(404, f"No such file: {file_id!r}.", "file_id")
    return row


@router.get("/v1/files/{file_id}")
def get_file(file_id: str, who: CallerBy, db: StoreBy):
    return file_object(found(db, who, file_id))


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, who: CallerBy, db: StoreBy):
    return Response(found(db, who, file_id, content=True)["content"], media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, who: CallerBy, db: StoreBy):
    if not db.delete_file(owner(who), file_id):
        raise ApiError(404, f"No such file: {file_id!r}.", "file_id")
    return {"id": file_id, "object": "file", "deleted": True}
