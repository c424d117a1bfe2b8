"""The README's table of bad inputs matches what the code raises (see readme_errors.py): every
row with every available backend as the default, and the whole table again in a fresh process
without TRITON_INTERPRET, where the Triton-on-CPU row applies. The tests in test_errors.py
cover the same failures more widely; this keeps the table honest."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import kasmina_kernels as kk
from kasmina_kernels.backends import ENV_VAR

from cases import backend_params
from readme_errors import Row, problem, rows

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = rows()
NO_INTERPRETER_ROW = "Triton on CPU without its interpreter"


def test_the_table_is_there_and_covers_each_kind_of_error():
    assert len(ROWS) >= 20
    kinds = {r.raises for r in ROWS}
    assert kinds == {"ValueError", "TypeError", "RuntimeError", "kk.BackendUnavailableError"}
    assert len({r.call for r in ROWS}) == len(ROWS), "two rows with the same call"


def _params():
    params = []
    for p in backend_params(include_reference=True):
        backend = p.values[0]
        for row in ROWS:
            if row.names_backend:
                continue  # the row picks its backend itself: run once, below
            params.append(pytest.param(backend, row, id=f"{backend}-{row.what}", marks=p.marks))
    for row in ROWS:
        if row.names_backend and row.what != NO_INTERPRETER_ROW:
            params.append(pytest.param(None, row, id=row.what))
    return params


@pytest.mark.parametrize("backend,row", _params())
def test_row(backend, row: Row, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    if backend is None:
        assert problem(row) is None, f"README row {row.what!r}: {problem(row)}"
        return
    with kk.use_backend(backend):
        why = problem(row)
    assert why is None, f"README row {row.what!r} with backend {backend!r}: {why}"


def test_every_row_in_a_process_without_the_triton_interpreter():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ENV_VAR)}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "readme_errors.py")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("OK\t") == len(ROWS), proc.stdout
    triton_row = next(r for r in ROWS if r.what == NO_INTERPRETER_ROW)
    assert f"OK\t{triton_row.call}\t" in proc.stdout, proc.stdout


def test_a_wrong_row_is_caught():
    """The checker itself: a wrong type, a wrong message and a call that succeeds all fail."""
    assert problem(Row("x", 'kk.gated_pool(x, "rnn")', "TypeError", "topology")) is not None
    assert problem(Row("x", 'kk.gated_pool(x, "rnn")', "ValueError", "no such words")) is not None
    assert problem(Row("x", 'kk.gated_pool(x, "cnn")', "ValueError", "")) == "raised nothing"
