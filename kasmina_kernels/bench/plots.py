"""PNG plots of a benchmark run (matplotlib, Agg backend): GB/s against size per op and
implementation, with the device copy for reference; speedup bars at Esper's shapes."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

from .plan import NAMED_GROUPS
from .report import FB, PEERS, _impl_names, _kernels, _shape, conclusive

COLORS = {"eager": "#7f7f7f", "compile": "#1f77b4", "native": "#d62728", "triton": "#2ca02c"}


@contextlib.contextmanager
def _figure(path: Path, title: str, rows: int, cols: int, size: tuple[float, float]):
    """A grid of axes to draw on, saved to `path` with the first panel's legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    yield axes
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bandwidth_vs_size(records: list[dict], path: Path, title: str) -> bool:
    """One panel per (dtype, op) of the size sweep: forward+backward GB/s against feature
    MiB per implementation, and the copy's GB/s. False when there is no sweep."""
    rows = [r for r in records if r.get("group") == "sweep" and "copy" in r]
    if not rows:
        return False
    ops, dtypes, impls = sorted({r["op"] for r in rows}), sorted({r["dtype"] for r in rows}), _impl_names(rows)
    # on CUDA the kernels' own device time shows bandwidth; event time there is mostly the
    # host's launch and autograd overhead until tensors are large
    kernel = all("kernel_GBps" in r["copy"] for r in rows)
    gb_key = "kernel_GBps" if kernel else "GBps"
    with _figure(path, title, len(dtypes), len(ops), (4.2 * len(ops), 3.4 * len(dtypes))) as axes:
        for (i, dt), (j, op) in itertools.product(enumerate(dtypes), enumerate(ops)):
            ax = axes[i][j]
            sel = sorted((r for r in rows if r["op"] == op and r["dtype"] == dt), key=lambda r: r["feature_bytes"])
            x = [r["feature_bytes"] / 2**20 for r in sel]
            ax.plot(x, [r["copy"][gb_key] for r in sel], "k--", label="device copy")
            for n in impls:
                pts = [(xx, r["impls"][n][gb_key][FB]) for xx, r in zip(x, sel)
                       if FB in r["impls"].get(n, {}).get(gb_key, {})]
                if pts:
                    ax.plot(*zip(*pts), "o-", color=COLORS.get(n), label=n)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {dt}", fontsize=10)
            ax.set(xlabel="feature tensor MiB",
                   ylabel="fwd+bwd GB/s (kernel time)" if kernel else "fwd+bwd GB/s")
            ax.grid(alpha=0.3)
    return True


def speedup_bars(records: list[dict], path: Path, title: str) -> bool:
    """Forward+backward speedup of each kernel backend against each peer at Esper's shapes
    (and the small shape), log scale: one panel per (dtype, peer), one bar group per op and
    shape; hatched and faint where the timings do not support the ratio."""
    rows = [r for r in records if r.get("group") in NAMED_GROUPS]
    kernels = _kernels(rows)
    if not rows or not kernels:
        return False
    dtypes = sorted({r["dtype"] for r in rows})
    groups = max(sum(r["dtype"] == dt for r in rows) for dt in dtypes)
    width = min(24.0, max(8.0, 0.25 * groups * len(kernels) + 2))
    bar = 0.8 / len(kernels)
    with _figure(path, title, len(dtypes) * len(PEERS), 1, (width, 3.6 * len(dtypes) * len(PEERS))) as axes:
        for (i, dt), (j, peer) in itertools.product(enumerate(dtypes), enumerate(PEERS)):
            sel = [r for r in rows if r["dtype"] == dt]
            ax = axes[i * len(PEERS) + j][0]
            for k, name in enumerate(kernels):
                impls = [r["impls"].get(name, {}) for r in sel]
                bars = ax.bar([p + k * bar for p in range(len(sel))],
                              [d.get("speedup", {}).get(peer, {}).get(FB, float("nan")) for d in impls],
                              bar, color=COLORS.get(name), label=name)
                for b, d in zip(bars, impls):
                    if not conclusive(d, peer, FB):
                        b.set_alpha(0.35)
                        b.set_hatch("//")
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_yscale("log", base=2)
            ax.set_xticks([p + bar * (len(kernels) - 1) / 2 for p in range(len(sel))])
            ax.set_xticklabels([f"{r['op']}\n{_shape(r['shape'])}" for r in sel], rotation=90, fontsize=6)
            ax.set_ylabel("speedup (fwd+bwd)")
            ax.set_title(f"{dt}: speedup vs {'eager' if peer == 'eager' else 'torch.compile'} "
                         "(above 1: the backend is faster; hatched: inconclusive)", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    return True
