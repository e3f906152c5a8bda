"""Documented commands are code: every shell and Python block of README.md, and of each docs page
that marks itself runnable (`<!-- docs-test: runnable -->`), runs here in order, on the tiny test
model, so a documented flow that stops composing fails the tests.

A page runs in a folder of its own that holds the data files its blocks name (`acme.jsonl`,
`globex.jsonl`, ...: rows of a made-up task). Before a block runs, these substitutions make it
fit the test machine (and nothing else changes): a command's `smollm2-135m` (a server's
`--model` with `--served_model_name smollm2-135m`, so its clients' requests stay as written), a
`load_model("smollm2-135m")` and `meta-llama/Llama-2-7b-hf` become the tiny model's folder; port
8000 a free port; `curl` fails on an HTTP error
(`--fail-with-body -sS`); every `tiedlora train` gets a budget of a few steps appended (flags given
later win). A `tiedlora serve` line starts the server in the background, as a user would in a
second terminal: the next lines run once it listens, and it is stopped (its process group, by
pid) before the next server starts and when the page ends. A block that must not run says why
just before it: `<!-- not run: <why> -->`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if "docs-test: runnable" in p.read_text())]
FENCE = re.compile(r"(?:<!-- not run: (?P<why>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)
RUNNABLE = {"sh": "sh", "bash": "sh", "shell": "sh", "python": "python"}
BUDGET = "--max_steps 2 --val_every 1 --val_rows 2 --test_rows 2 --max_new_tokens 4 --batch_size 4 --micro_batch_size 2"
EVAL_BUDGET = "--limit 4 --max_new_tokens 4"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "ADMIN_KEY": "admin-key-0123456789"}


def blocks(page: Path) -> list[tuple[str, str, str | None]]:
    """(language, code, why not run) of every fenced block of a language that runs, in order."""
    found = []
    for m in FENCE.finditer(page.read_text()):
        lang = RUNNABLE.get(m["lang"])
        if lang is not None:
            found.append((lang, m["code"], m["why"]))
        elif m["why"] is not None:
            raise AssertionError(
                f"{page.name}: a 'not run' marker before a {m['lang'] or 'plain'} block, which never runs"
            )
    return found


def substitute(code: str, model: str, port: int) -> str:
    # a server keeps the documented name for clients; everything that loads the model loads the tiny one
    code = re.sub(
        r"(?m)^(tiedlora serve .*)--model smollm2-135m", rf"\1--model {model} --served_model_name smollm2-135m", code
    )
    code = re.sub(r"(?m)^(tiedlora (?!serve)[^\n]*)smollm2-135m", rf"\1{model}", code)
    code = code.replace('load_model("smollm2-135m")', f"load_model({model!r})")
    code = code.replace("meta-llama/Llama-2-7b-hf", model)
    code = re.sub(r"\b8000\b", str(port), code)
    code = re.sub(r"(?m)(^|\s)curl ", r"\1curl --fail-with-body -sS ", code)
    code = re.sub(r"(?m)^(tiedlora eval [^#\n]*?)(\s+#.*)?$", rf"\1 {EVAL_BUDGET}\2", code)
    return re.sub(r"(?m)^(tiedlora train [^#\n]*?)(\s+#.*)?$", rf"\1 --model {model} {BUDGET}\2", code)


def commands(code: str) -> list[str]:
    """Shell lines, continuations joined and here-documents kept whole."""
    out: list[str] = []
    lines = iter(code.replace("\\\n", " ").splitlines())
    for line in lines:
        here = re.search(r"<<'?(\w+)'?", line)
        if here:
            body = [line]
            for more in lines:
                body.append(more)
                if more.strip() == here.group(1):
                    break
            line = "\n".join(body)
        out.append(line)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `tiedlora serve` line in the background: started in a process group of its own, awaited
    until it listens (or fails), stopped by its pid."""

    def __init__(self, line: str, cwd: Path, env: dict):
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            ["bash", "-c", line], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        threading.Thread(target=lambda: self.lines.extend(self.process.stderr), daemon=True).start()  # type: ignore[arg-type]
        deadline = time.monotonic() + 180
        while not any(" on http://" in x for x in self.lines):
            assert self.process.poll() is None, f"{line}\nended:\n{''.join(self.lines)}"
            assert time.monotonic() < deadline, f"{line}\ndid not start within 180 s:\n{''.join(self.lines)}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)


def data_rows(n: int, offset: int = 0, chat: bool = False) -> str:
    rows = [{"prompt": f"Q: what is {i + offset} plus {i}? A:", "completion": f" {2 * i + offset}"} for i in range(n)]
    if chat:
        rows = [
            {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in rows
        ]
    return "".join(json.dumps(r) + "\n" for r in rows)


# The data files the pages name, as a user would have them: (rows, offset, chat)
DATA = {"acme.jsonl": (40, 0, False), "globex.jsonl": (30, 7, False), "initech.jsonl": (30, 5, False)}
DATA |= {"my.jsonl": (30, 3, False), "other.jsonl": (10, 9, False), "globex_val.jsonl": (6, 11, False)}
DATA |= {"chats.jsonl": (30, 2, True), "held_out.jsonl": (6, 13, True)}


def run_shell(line: str, cwd: Path, env: dict) -> None:
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, f"{line}\nexit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_blocks_run_as_written(page, tiny_folder, tmp_path):
    found = blocks(page)
    assert any(why is None for _, _, why in found), f"{page.name} has no block that runs"
    for name, (n, offset, chat) in DATA.items():
        (tmp_path / name).write_text(data_rows(n, offset, chat))
    port = free_port()
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{ENV['PATH']}"}
    server: Server | None = None
    try:
        for lang, code, why in found:
            if why is not None:
                assert why.strip(), f"{page.name}: a 'not run' marker must say why"
                continue
            code = substitute(code, str(tiny_folder), port)
            if lang == "python":
                script = tmp_path / "block.py"
                script.write_text(code)
                out = subprocess.run(
                    [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
                )
                assert out.returncode == 0, f"{code}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
                continue
            for line in commands(code):
                if line.lstrip().startswith("tiedlora serve"):
                    if server is not None:
                        server.stop()
                    server = Server(line, tmp_path, env)
                elif line.strip() and not line.lstrip().startswith("#"):
                    run_shell(line, tmp_path, env)
    finally:
        if server is not None:
            server.stop()
