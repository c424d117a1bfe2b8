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
