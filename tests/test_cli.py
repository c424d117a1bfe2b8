"""The command line's bad arguments: an argparse error naming the argument (exit status 2),
never a traceback from deeper down."""

from __future__ import annotations

import pytest

from kasmina_kernels import cli

BAD = {
    "check --device cpux": "argument --device: 'cpux' is not a device",
    "check --device cuda:7": "argument --device: cuda:7: torch sees",
    "check --backends nope": "argument --backends: invalid choice: 'nope'",
    "check --shape 4,x": "argument --shape: expected 1 to 5 comma-separated sizes",
    "check --shape 0,3": "argument --shape: expected 1 to 5 comma-separated sizes",
    "bench --device cpux": "argument --device: 'cpux' is not a device",
    "bench --backends nope": "argument --backends: invalid choice: 'nope'",
    "bench --threads 0": "argument --threads: expected a whole number of at least 1",
    "bench --threads two": "argument --threads: expected a whole number of at least 1",
    "bench --time-limit -1": "argument --time-limit: expected a number of at least 0",
    "bench --time-limit nan": "argument --time-limit: expected a number of at least 0",
}


@pytest.mark.parametrize("argv", list(BAD))
def test_bad_arguments_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv.split())
    assert exit_info.value.code == 2
    assert BAD[argv] in capsys.readouterr().err


def test_check_runs_with_parsed_arguments(capsys):
    """The parsed device and shape reach the check (one small float32 run on the CPU)."""
    assert cli.main(["check", "--device", "cpu", "--shape", "2,3,4,4", "--dtypes", "float32",
                     "--backends", "native"]) == 0
    out = capsys.readouterr().out
    assert "shape (2, 3, 4, 4), device cpu" in out and "all outputs within bounds" in out
