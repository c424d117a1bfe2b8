"""Shared pytest configuration for the kasmina-kernels suite.

- Registers the markers used here (``equivalence``, ``big``).
- Counts, per backend, how many equivalence cases ran, passed, failed and were skipped, and
  prints that at the end of the run ("equivalence cases run: native=... triton=..."), so CI
  shows when a backend silently ran nothing.
- Fails loudly at the end if any skip carried no reason.
- Registers the Hypothesis profiles of the property-based tests (test_fuzz.py): "ci" (the
  default: a bounded, derandomized number of examples) and "thorough" (many more, random,
  with Hypothesis's example database). Pick one with KASMINA_HYPOTHESIS_PROFILE=thorough or
  pytest's --hypothesis-profile=thorough.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(__file__))

from cases import cases_for  # noqa: E402,F401  (re-exported: cases_for(backend))

HYPOTHESIS_PROFILES = {"ci": 40, "thorough": 600}  # examples per op and backend


def _register_hypothesis_profiles() -> None:
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # test_fuzz.py skips with the reason
        return
    common = dict(deadline=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=HYPOTHESIS_PROFILES["ci"], derandomize=True,
                              database=None, **common)
    settings.register_profile("thorough", max_examples=HYPOTHESIS_PROFILES["thorough"], **common)
    settings.load_profile(os.environ.get("KASMINA_HYPOTHESIS_PROFILE", "ci"))


_register_hypothesis_profiles()

_tally: dict[str, Counter] = defaultdict(Counter)
_backend_of: dict[str, str] = {}
_reasonless_skips: list[str] = []


def pytest_configure(config):
    # torch.compile's structured trace logs would otherwise flood pytest's captured-log report
    logging.getLogger("torch.__trace").propagate = False
    config.addinivalue_line("markers", "equivalence: a kernel-vs-reference equivalence case")
    config.addinivalue_line(
        "markers", "big: an Esper-sized equivalence case (native only, a few combinations)"
    )
    config.addinivalue_line("markers", "fuzz: a property-based (Hypothesis) equivalence test")
    config.addinivalue_line("markers", "large: over 2**31 elements (opt-in: KASMINA_TEST_LARGE=1)")


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        if item.get_closest_marker("equivalence") is None:
            continue
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "backend" in callspec.params:
            _backend_of[item.nodeid] = callspec.params["backend"]


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not reason or reason.strip() in ("Skipped", "Skipped:", ""):
            _reasonless_skips.append(report.nodeid)
    backend = _backend_of.get(report.nodeid)
    if backend is None:
        return
    if report.when == "call":
        _tally[backend]["passed" if report.passed else "failed"] += 1
    elif report.when == "setup" and not report.passed:
        _tally[backend]["skipped" if report.skipped else "failed"] += 1
    elif report.when == "teardown" and report.failed:
        _tally[backend]["failed"] += 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _backend_of:
        return
    backends = sorted(set(_backend_of.values()))
    ran = " ".join(
        f"{b}={_tally[b]['passed'] + _tally[b]['failed']}" for b in backends
    )
    terminalreporter.write_sep("=", "kasmina equivalence")
    terminalreporter.write_line(f"equivalence cases run: {ran}")
    for b in backends:
        t = _tally[b]
        terminalreporter.write_line(
            f"  {b}: passed={t['passed']} failed={t['failed']} skipped={t['skipped']}"
        )
    if os.environ.get("MALLOC_PERTURB_"):
        terminalreporter.write_line(
            f"  allocations poisoned: MALLOC_PERTURB_={os.environ['MALLOC_PERTURB_']}"
        )
    if _reasonless_skips:
        terminalreporter.write_line("skips without a reason: " + ", ".join(_reasonless_skips))


def pytest_sessionfinish(session, exitstatus):
    if _reasonless_skips and session.exitstatus == 0:
        session.exitstatus = 1
