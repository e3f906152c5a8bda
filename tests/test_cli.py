import json
import os
import subprocess
import sys

import pytest

from tiedlora.cli import main

from conftest import TINY

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "tiedlora", *args], capture_output=True, text=True, env=ENV, timeout=120
    )


def test_params_prints_the_paper_numbers():
    out = run("params", "--model", "llama2-7b", "--rank", "8")
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()[2:]}
    assert lines["lora"] == ["4,194,304", "100.0%"]
    assert lines["tl5"] == ["131,072", "3.1%"]
    assert [lines[n][1] for n in ("vera", "tl1", "tl2", "tl3", "tl4", "tl6")] == [
        "9.4%",
        "0.8%",
        "10.2%",
        "2.3%",
        "2.3%",
        "12.5%",
    ]


def test_params_json(capsys):
    assert main(["params", "--model", "gpt-2b-001", "--rank", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["config"] for r in rows] == ["lora", "vera", "tl1", "tl2", "tl3", "tl4", "tl5", "tl6"]
    assert set(rows[0]) == {"config", "params", "percent_of_lora"}
    by = {r["config"]: r for r in rows}
    assert (round(by["vera"]["percent_of_lora"], 1), round(by["tl6"]["percent_of_lora"], 1)) == (18.8, 22.9)


def test_params_from_a_local_config(tmp_path, capsys):
    TINY["gpt2"]().save_pretrained(tmp_path)
    for where in (tmp_path, tmp_path / "config.json"):
        assert main(["params", "--model", str(where), "--rank", "2", "--json"]) == 0
        by = {r["config"]: r["params"] for r in json.loads(capsys.readouterr().out)}
        assert by["lora"] == 3 * (32 * 2 + 96 * 2) and by["tl5"] == 32 * 2 + 96 * 2


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["params", "--model", "no-such-model"],
            "--model 'no-such-model' is not a preset (llama2-7b, gpt-2b-001, smollm2-135m)",
        ),
        (["params", "--rank", "0"], "rank=0 must be a positive integer"),
    ],
)
def test_bad_input_is_one_line_not_a_traceback(args, message):
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_serve_lists_every_option_of_serve_config_with_its_help_and_default(capsys):
    from dataclasses import fields

    import docstring_parser

    from tiedlora.serve.config import ServeConfig

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    helps = {
        p.arg_name: " ".join((p.description or "").split())
        for p in docstring_parser.parse_from_object(ServeConfig).params
    }
    for f in fields(ServeConfig):
        default = "null" if f.default is None else f.default
        assert f"--{f.name}" in out and helps[f.name] and f"{helps[f.name]} (type: " in out, f.name
        assert f"default: {default})" in out, f.name
