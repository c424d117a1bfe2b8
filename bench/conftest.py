"""pytest-benchmark microbenchmarks of every op x backend x dtype x shape, forward and
forward+backward (see bench/README.md). Collected only when bench/ is named: the project's
pytest configuration points plain `pytest` at tests/. Options: --bench-device, --bench-shapes."""

from __future__ import annotations

from kasmina_kernels.bench.plan import default_device


def pytest_addoption(parser):
    group = parser.getgroup("kasmina bench")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--bench-shapes", default="all", choices=("small", "esper", "all"),
                    help="which shapes to benchmark (default: all)")


def pytest_report_header(config):
    return (f"kasmina bench: device {default_device(config.getoption('--bench-device'))}, "
            f"shapes {config.getoption('--bench-shapes')}")
