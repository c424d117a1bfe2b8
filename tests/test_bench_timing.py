"""The benchmark's timing helpers that can be checked without a GPU."""

from kasmina_kernels.bench.timing import _busy_ns


def test_busy_time_is_the_union_of_intervals():
    assert _busy_ns([]) == 0
    assert _busy_ns([(0, 10), (20, 25)]) == 15  # a gap between launches is not busy time
    assert _busy_ns([(0, 10), (5, 12)]) == 12  # overlapping work on two streams counts once
    assert _busy_ns([(5, 12), (0, 10), (11, 11)]) == 12  # unsorted, empty interval inside
    assert _busy_ns([(0, 100), (10, 20), (30, 40)]) == 100  # nested


def test_transparent_huge_pages_reads_the_selected_mode(tmp_path, monkeypatch):
    from kasmina_kernels.bench.report import transparent_huge_pages

    sysfs = tmp_path / "enabled"
    sysfs.write_text("always [madvise] never\n")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert transparent_huge_pages(str(sysfs)) == "madvise (THP_MEM_ALLOC_ENABLE=1)"
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    assert transparent_huge_pages(str(tmp_path / "missing")) == "unknown (THP_MEM_ALLOC_ENABLE=unset)"


# ---------------------------------------------------------------- when a ratio is a verdict
import random  # noqa: E402

from kasmina_kernels.bench import report, sweep  # noqa: E402
from kasmina_kernels.bench.command import default_threads  # noqa: E402
from kasmina_kernels.bench.timing import MIN_ROUNDS, SPREAD_LIMIT, Sample, compare  # noqa: E402


def _sample(round_values):
    """A Sample from timings grouped by round, as time_interleaved builds it."""
    return Sample.of([t for r in round_values for t in r], round_values)


def _rounds(center, jitter, rounds=MIN_ROUNDS, calls=20, seed=0):
    rng = random.Random(seed)
    return [[center * (1 + rng.uniform(-jitter, jitter)) for _ in range(calls)] for _ in range(rounds)]


def test_tight_timings_give_a_verdict():
    peer, fast = _sample(_rounds(1.2e-3, 0.02, seed=1)), _sample(_rounds(1.0e-3, 0.02, seed=2))
    c = compare(peer, fast)
    assert c["conclusive"] and c["why"] is None
    assert 1.15 < c["ratio"] < 1.25 and len(c["round_ratios"]) == MIN_ROUNDS
    c = compare(fast, peer)  # the other way round: conclusively slower
    assert c["conclusive"] and c["ratio"] < 1


def test_bimodal_timings_are_inconclusive():
    # a 0.4 ms call that loses an 8 ms scheduler quantum about half the time (a loaded 2-core
    # machine with more threads than free cores): no typical call
    rng = random.Random(3)
    bimodal = [[0.4e-3 + (8e-3 if rng.random() < 0.5 else 0.0) for _ in range(20)] for _ in range(5)]
    peer = _sample(_rounds(0.5e-3, 0.02, seed=4))
    s = _sample(bimodal)
    assert s.spread > SPREAD_LIMIT
    c = compare(peer, s, peer_name="eager", candidate_name="native")
    assert not c["conclusive"] and "native timings spread" in c["why"]


def test_rounds_that_disagree_are_inconclusive():
    # each candidate tight within a round, but the machine's conditions moved between rounds
    # and the ratio flips side: 1.03x overall is not supported
    peer = _sample([[t] * 9 for t in (1.10e-3, 0.98e-3, 1.08e-3, 1.06e-3, 0.99e-3, 1.05e-3, 1.07e-3)])
    cand = _sample([[1.0e-3] * 9 for _ in range(7)])
    c = compare(peer, cand)
    assert c["ratio"] > 1 and not c["conclusive"]
    assert c["why"].startswith("2 of 7 rounds on the other side of 1.00x")


def test_too_few_rounds_are_inconclusive_however_they_agree():
    # two implementations that tie put every one of n rounds on one side 2 / 2**n of the time:
    # 1 in 16 at 5 rounds, so a verdict takes MIN_ROUNDS rounds (1 in 64 at 7)
    assert 2 / 2**MIN_ROUNDS <= 1 / 64
    few = MIN_ROUNDS - 1
    c = compare(_sample(_rounds(1.2e-3, 0.01, rounds=few)), _sample(_rounds(1e-3, 0.01, rounds=few)))
    assert not c["conclusive"] and c["why"] == f"{few} paired rounds (a verdict needs {MIN_ROUNDS})"
    assert compare(_sample(_rounds(1.2e-3, 0.01)), _sample(_rounds(1e-3, 0.01)))["conclusive"]


def test_default_threads_cannot_oversubscribe():
    assert default_threads("cpu", 2, 2)[0] == 1
    assert default_threads("cpu", 1, 8)[0] == 1
    assert default_threads("cpu", 6, 16)[0] == 6  # affinity narrower than torch's default
    assert default_threads("cpu", 64, 32)[0] == 32
    n, why = default_threads("cuda", 2, 16)
    assert n == 16 and "torch's default" in why


def _record(peer_round_values, native_round_values, copy_fraction=0.5):
    fb = report.FB
    impls = {}
    for name, rv in (("eager", peer_round_values), ("native", native_round_values)):
        s = _sample(rv).__dict__
        impls[name] = {m: dict(s) for m in ("forward", "backward", fb)}
        impls[name]["check"] = {"ok": True, "problems": [], "max_error_vs_reference": 0.0}
    record = {"op": "blend_add", "shape": [8, 4, 2, 2], "dtype": "float32", "group": "esper",
              "pattern": "isolated", "impls": impls, "failures": [], "notes": [],
              "bytes": {"forward": 1000, "backward": 1000}}
    s = impls["native"]["forward"]["median"]
    record["copy"] = {"GBps": 2000 / s / 1e9 / (2 * copy_fraction)}
    sweep.derive(record, "cpu")
    return record


def test_report_counts_only_supported_ratios_and_flags_above_copy():
    tight = _record(_rounds(1.5e-3, 0.02, seed=5), _rounds(1.0e-3, 0.02, seed=6))
    native = tight["impls"]["native"]
    assert native["speedup_support"]["eager"][report.FB]["conclusive"]
    assert report._ratio(native, "eager", report.FB) == "1.50x"
    noisy = _record(_rounds(1.02e-3, 0.6, seed=7), _rounds(1.0e-3, 0.6, seed=8))
    assert report._ratio(noisy["impls"]["native"], "eager", report.FB).endswith("x ~")
    fast_copy = _record(_rounds(1.5e-3, 0.02, seed=5), _rounds(1.0e-3, 0.02, seed=6),
                        copy_fraction=1.69)
    d = fast_copy["impls"]["native"]
    assert report._bandwidth(d, "forward").endswith("(169%) (!)")
    support = d["speedup_support"]["eager"]["forward"]
    assert not support["conclusive"] and "above a same-size copy" in support["why"]
    text = "\n".join(report.verdicts([tight, noisy]))
    assert "native is ahead of eager PyTorch in forward+backward in all 1 cases with a verdict" in text
    assert "inconclusive, not counted (1 of 2)" in text
    assert any("`~`" in line for line in report.legend())


def test_result_check_keeps_the_peer_apart_from_the_library():
    r = _record(_rounds(1.5e-3, 0.02), _rounds(1.0e-3, 0.02))
    r["impls"]["compile"] = {"check": {"ok": False, "problems": ["out: 3 elements off"]}}
    text = "\n".join(report.result_check([r]))
    library, peers = text.split("**The peers**")
    assert "native: outputs and gradients matched the reference in all 1 entries" in library
    assert "FAILED" not in text
    assert "matched the equivalence rule in 0 of 1 entries judged" in peers
    assert "out: 3 elements off" in peers
    r["impls"]["native"]["check"] = {"ok": False, "problems": ["dh: off"]}
    assert "**native: FAILED in 1 of 1 entries**" in "\n".join(report.result_check([r]))


def test_speedup_plot_draws_inconclusive_bars_apart(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    from kasmina_kernels.bench import plots

    tight = _record(_rounds(1.5e-3, 0.02, seed=5), _rounds(1.0e-3, 0.02, seed=6))
    noisy = _record(_rounds(1.02e-3, 0.6, seed=7), _rounds(1.0e-3, 0.6, seed=8))
    assert plots.speedup_bars([tight, noisy], tmp_path / "speedup.png", "test")
    assert (tmp_path / "speedup.png").stat().st_size > 0
