"""Every option of `tiedlora serve`, its default and its help, in one place: the command line
lists them from here, and `build`, the engine and the app read them from here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TiedLoraError
from ..models import SMOLLM2
from ..multi import MAX_RANK

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ServeConfig:
    """The options of `tiedlora serve`."""

    model: str = SMOLLM2
    """The base model: smollm2-135m (bundled), a local model folder, or a Hub id."""
    served_model_name: str | None = None
    """The base model's id in requests, in /v1/models and in the ft: names of the models its jobs make (default:
    --model, or a folder's own name: no server path is shown to clients)."""
    quantize: str | None = None
    """Hold the base's decoder layers in 8bit or 4bit (NF4) with bitsandbytes, on a GPU or the CPU; adapters stay in
    --dtype on top of them."""
    adapters: str = "runs"
    """Register every run folder (its best/) and adapter folder under it, named by relative path; each is
    read on its first request. Without this folder the base model is served alone."""
    host: str = "127.0.0.1"
    """The address to listen on."""
    port: int = 8000
    """The port (0: any free one, printed at start)."""
    max_batch: int = 32
    """At most this many rows decoded together; the others wait for a place."""
    max_prompt_tokens: int = 2048
    """Longer prompts are refused."""
    max_tokens_limit: int = 1024
    """The largest max_tokens a request may ask for."""
    max_resident: int = 512
    """At most this many adapters loaded at once; the least recently used idle one is evicted."""
    prefill_tokens: int = 256
    """At most this many prompt tokens read between two decode steps (longer prompts in chunks)."""
    max_request_bytes: int = 1 << 20
    """Larger request bodies are refused (413)."""
    max_rank: int = MAX_RANK
    """Adapters of a larger rank are refused (each row computes at its own adapter's rank, rounded up to a power of
    two)."""
    device: str = "auto"
    """Where the base model and the adapter banks live: auto (the GPU when there is one), cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """The base model's and the banks' dtype: auto (bfloat16 on a GPU; float32 on a CPU, where plain bf16 weights
    measured slower), float32, bfloat16 or float16."""
    pin: list[str] | None = None
    """Adapters loaded at start and never evicted (at most max_resident - 1: one place stays free)."""
    api_key: str | None = None
    """The administrator's key (default: $TIEDLORA_API_KEY): every request must send `Authorization: Bearer KEY`
    (or a tenant's key); without it and --tenants the server is open to anyone who reaches it."""
    tenants: str | None = None
    """A JSON file of tenants' keys, {"acme": ["key-1", "sha256:<hex>"]}: a tenant's key sees and uses the base
    model and the adapters under <adapters>/acme/ (named acme/<name>), nothing else."""

    state: str | None = None
    """A folder for the fine-tuning service's state (a SQLite database): with it, tenants upload fine-tuning
    files (/v1/files)."""
    store: str | None = None
    """Instead of --state's SQLite file, any SQLAlchemy database URL (postgresql://...) that servers share."""
    max_file_bytes: int = 100 << 20
    """Uploaded files larger than this are refused (413)."""
    max_tenant_bytes: int = 1 << 30
    """At most this many bytes of files per tenant."""
    max_running_jobs: int = 8
    """Fine-tuning jobs one training process trains at once, together in one batch."""
    max_queued_jobs: int = 16
    """Fine-tuning jobs a tenant may have waiting to start; more are refused (429)."""
    training_processes: int = 1
    """Training processes this server starts beside itself (0: it only queues jobs, for servers that share a
    --store with others that train)."""
    train_precision: str = "auto"
    """Fine-tuning jobs' training matmuls, as tiedlora train's --precision: auto, bf16 or fp32."""
    job_lease_s: float = 30.0
    """A running job whose training process has not renewed it for this long (it died with its server) is taken up
    again by another, from its last checkpoint."""

    def __post_init__(self) -> None:
        limits = ["max_batch", "max_prompt_tokens", "max_tokens_limit", "max_resident", "prefill_tokens"]
        limits += ["max_request_bytes", "max_file_bytes", "max_tenant_bytes", "max_running_jobs", "max_queued_jobs"]
        if min(getattr(self, name) for name in (*limits, "max_rank")) < 1:
            raise TiedLoraError(f"--{', --'.join(limits)} and --max_rank must be at least 1.")
        if self.training_processes < 0 or not self.job_lease_s > 0:
            raise TiedLoraError("--training_processes must be 0 or more and --job_lease_s above 0.")
        if self.dtype not in DTYPES:
            raise TiedLoraError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}.")
        if self.quantize not in (None, "8bit", "4bit"):
            raise TiedLoraError(f"--quantize {self.quantize!r}: choose 8bit or 4bit, or leave it unset.")
        if self.served_model_name is not None and not check_model_id(self.served_model_name):
            raise TiedLoraError(
                f"--served_model_name {self.served_model_name[:80]!r}: use 1 to 256 printable characters without "
                "':' (a fine-tuned model's name is ft:<base>:<tenant>:...)."
            )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise TiedLoraError(f"--device {self.device!r}: choose auto, cpu, cuda or cuda:N (N a GPU's index).")
        if len(self.pin or []) >= self.max_resident:
            raise TiedLoraError(
                f"--pin names {len(self.pin or [])} adapters, --max_resident is {self.max_resident}: pin at most "
                f"{self.max_resident - 1}, so that every other adapter has a place to load into."
            )

    @property
    def model_id(self) -> str:
        """The base model's public id: --served_model_name, else --model as given, but a local folder by its own
        name, so that no server path reaches a client."""
        if self.served_model_name is not None:
            return self.served_model_name
        path = Path(self.model)
        return path.resolve().name if self.model != SMOLLM2 and path.exists() else self.model

    def placement(self) -> tuple[torch.device, torch.dtype]:
        """(device, dtype) with "auto" resolved on this machine; a GPU asked for but absent is an error."""
        if self.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(self.device)
        if device.type == "cuda" and (
            not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
        ):
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise TiedLoraError(
                f"--device {self.device}: this machine has {found} GPU(s) torch can use; pass --device cpu."
            )
        dtype = DTYPES[self.dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        return device, dtype


def check_model_id(name: str) -> bool:
    """A base model id clients can send and read back, and that splits out of `ft:` names."""
    return 0 < len(name) <= 256 and name.strip() == name and name.isprintable() and ":" not in name
