"""The README's table of bad inputs ("## Bad input and the error it gets"), read and run: each
row names a call, the exception it raises and a regular expression its message matches.
Used by test_readme_errors.py, in the test process and in a fresh one (`python
readme_errors.py` prints one line per row and exits 1 if any row does not hold)."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

import torch

import kasmina_kernels as kk
from kasmina_kernels.validation import InputError

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "README.md")
SECTION = "## Bad input and the error it gets"


@dataclass(frozen=True)
class Row:
    what: str
    call: str
    raises: str
    pattern: str

    @property
    def names_backend(self) -> bool:
        return "backend=" in self.call


def _code(cell: str) -> str:
    cell = cell.strip()
    if not (cell.startswith("`") and cell.endswith("`")):
        raise ValueError(f"README bad-input table: expected a `code` cell, got {cell!r}")
    return cell[1:-1]


def rows(path: str = README) -> list[Row]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    out = []
    for line in text[start:end if end >= 0 else None].splitlines():
        if not line.startswith("| ") or line.startswith("| ---") or line.startswith("| bad input |"):
            continue
        cells = [c for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 4:
            raise ValueError(f"README bad-input table: a row needs 4 cells: {line!r}")
        out.append(Row(cells[0].strip(), _code(cells[1]), _code(cells[2]), _code(cells[3])))
    return out


def namespace() -> dict:
    """The names the table's calls use (as its preamble describes them)."""
    g = torch.Generator().manual_seed(0)
    return {
        "kk": kk, "torch": torch,
        "h": torch.randn(2, 3, 4, 5, generator=g), "s": torch.randn(2, 3, 4, 5, generator=g),
        "a": torch.tensor(0.5), "x": torch.randn(2, 16, 3, 3, generator=g),
        "w1": torch.randn(8, 16, generator=g), "b1": torch.randn(8, generator=g),
        "w2": torch.randn(1, 8, generator=g), "b2": torch.randn(1, generator=g),
    }


def problem(row: Row) -> str | None:
    """None when the row's call raises what the row says, else what went wrong."""
    ns = namespace()
    expected = eval(row.raises, ns)  # noqa: S307 - the README's own cell, e.g. `ValueError`
    try:
        eval(row.call, ns)  # noqa: S307
    except Exception as exc:  # noqa: BLE001 - judged below
        raised = type(exc)
        if issubclass(raised, InputError):  # the checks' classes, documented as their builtin base
            raised = next(base for base in raised.__bases__ if base is not InputError)
        if raised is not expected:
            return f"raised {type(exc).__name__}: {exc}"
        if not re.search(row.pattern, str(exc)):
            return f"message {str(exc)!r} does not match {row.pattern!r}"
        return None
    return "raised nothing"


if __name__ == "__main__":
    bad = 0
    for row in rows():
        why = problem(row)
        bad += why is not None
        print(f"{'OK' if why is None else 'FAIL'}\t{row.call}\t{why or ''}")
    sys.exit(1 if bad else 0)
