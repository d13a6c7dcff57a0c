"""Entry points print the project's own errors as one line (``error: ...``, exit 2); bugs keep tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_cascade import fake_args

import cascadevlm.cli as evaluate_module
from cascadevlm.cli import evaluate_main, train_main
from cascadevlm.errors import is_user_error, one_line

REPO = Path(__file__).resolve().parents[1]


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert not any(line.startswith("Traceback") for line in lines)
    return lines[-1]


def test_option_error_is_one_line_with_exit_2(tiny_clip_path, data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CASCADEVLM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as done:
        evaluate_main(fake_args(tiny_clip_path, data_root, tmp_path, "r", "--cascade.topk", "0"))
    assert done.value.code == 2
    assert (
        _error_line(capsys) == "error: cascade.topk must be between 1 and the number of classes (10), got 0"
    )


def test_parse_errors_are_one_line(capsys, monkeypatch):
    monkeypatch.delenv("CASCADEVLM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as done:
        evaluate_main(["--model.modle_name", "x"])
    assert done.value.code == 2
    assert _error_line(capsys) == "error: unrecognized arguments: --model.modle_name x"
    with pytest.raises(SystemExit) as done:
        evaluate_main(["--cascade.tau", "abc"])
    assert done.value.code == 2
    line = _error_line(capsys)
    assert (
        line.startswith('error: Parser key "cascade.tau":')
        and "expected a number, inf or -inf, got 'abc'" in line
    )
    with pytest.raises(SystemExit) as done:
        train_main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "method" / "linear_probe.yaml"),
                "--trainer.max_epohcs",
                "1",
            ]
        )
    assert done.value.code == 2
    line = _error_line(capsys)
    assert line.startswith("error: ") and "max_epohcs" in line


def test_debug_flag_and_env_show_the_traceback(tiny_clip_path, data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("CASCADEVLM_DEBUG", raising=False)
    bad = fake_args(tiny_clip_path, data_root, tmp_path, "r", "--cascade.sweep_points", "1")
    with pytest.raises(ValueError, match="cascade.sweep_points must be >= 2, got 1"):
        evaluate_main([*bad, "--debug"])
    monkeypatch.setenv("CASCADEVLM_DEBUG", "1")
    with pytest.raises(ValueError, match="cascade.sweep_points must be >= 2, got 1"):
        evaluate_main(bad)


def test_unexpected_exceptions_keep_their_traceback(tiny_clip_path, data_root, tmp_path, monkeypatch):
    monkeypatch.delenv("CASCADEVLM_DEBUG", raising=False)

    def bug(cli):
        return int("not a number")  # a ValueError, but not one of the project's messages

    monkeypatch.setattr(evaluate_module, "evaluate", bug)
    with pytest.raises(ValueError, match="invalid literal"):
        evaluate_main(fake_args(tiny_clip_path, data_root, tmp_path, "r"))
    assert not is_user_error(ZeroDivisionError("x"))
    assert one_line(KeyError("no class 'x'")) == "no class 'x'"
    assert one_line(ValueError("a\n  b")) == "a b"


@pytest.mark.parametrize(
    ("cmd", "expected"),
    [
        pytest.param(["evaluate.py", "--cascade.budget", "2"],
                     "error: cascade.budget must be a fraction in [0, 1], got 2.0", marks=pytest.mark.slow),
        pytest.param(["train.py", "fit", "--trainer.max_epohcs", "1"],
                     "error: unrecognized arguments: --trainer.max_epohcs 1", marks=pytest.mark.slow),
        (["-m", "cascadevlm.cascade.settings", "--shots", "[0]"], "error: the following arguments are required: evaluate"),
    ],
)  # fmt: skip
def test_entry_scripts_print_one_line(tiny_clip_path, data_root, tmp_path, cmd, expected):
    if cmd[0] == "evaluate.py":
        cmd = [*cmd, *fake_args(tiny_clip_path, data_root, tmp_path, "r")]
    env = {k: v for k, v in os.environ.items() if k != "CASCADEVLM_DEBUG"}
    p = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(env, PYTHONWARNINGS="ignore"))  # fmt: skip
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == expected, p.stderr[-2000:]
