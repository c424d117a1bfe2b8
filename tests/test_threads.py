"""Threads (as DataParallel runs one replica per thread): concurrent calls from several Python
threads all return what a lone call returns, bit for bit, and the default-backend state is per
thread, so one thread's `use_backend(...)` block is invisible to the others and leaves nothing
behind when it ends (even by an exception).

The rest of the package's module-level state is caches of facts settled at import (backend
availability, what "auto" picks per device type, the loaded extension), written before any
op runs and never changed by a call; `test_module_state_is_settled_at_import` pins that.
The environment variable KASMINA_KERNELS_BACKEND is process-wide by nature (os.environ).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import kasmina_kernels as kk
from kasmina_kernels import backends, ops
from kasmina_kernels.opcases import make, run_with_grads
from kasmina_kernels.optable import OPS

from cases import backend_device_params
from test_contracts import bits_equal

# an exception in any thread fails the test it happened in
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

N_THREADS = 4
ROUNDS = 3
SHAPE = {("native", "cpu"): (8, 16, 12, 12), ("native", "cuda"): (8, 16, 12, 12),
         ("triton", "cuda"): (8, 16, 12, 12)}
# Triton's interpreter swaps triton.language's functions for interpreted ones for the length of
# each kernel call and swaps them back after (triton/runtime/interpreter.py, _patch_lang), process
# wide: a second thread's kernel then fails with "Did you forget to add @triton.jit ?". A limit
# of the CPU test harness, not of the kernels; Triton on CUDA is tested here when a GPU is lent.
INTERPRETER_NOT_THREAD_SAFE = (
    "Triton's CPU interpreter patches triton.language process-wide during each kernel call, so "
    "concurrent interpreted kernels break each other; Triton is tested concurrently on CUDA"
)


def _params():
    out = []
    for p in backend_device_params():
        backend, device = p.values
        if (backend, device) == ("triton", "cpu"):
            p = pytest.param(backend, device, id=p.id, marks=[pytest.mark.skip(reason=INTERPRETER_NOT_THREAD_SAFE)])
        out.append(p)
    return out


def _jobs(backend, device):
    """One job per op and dtype: (name, callable returning {"y", "d<input>"...})."""
    jobs = []
    for i, case in enumerate(OPS):
        for dtype in (torch.float32, torch.bfloat16):
            shape = SHAPE[(backend, device)]
            if case.name == "gate_effective_alpha":
                shape = (shape[0], 1, 1, 1)
            args, kwargs = make(case, shape, dtype, device, torch.Generator().manual_seed(100 + i))
            fn = case.public

            def job(case=case, fn=fn, args=args, kwargs=kwargs):
                return run_with_grads(case, lambda *a, **k: fn(*a, **k, backend=backend), args, kwargs)

            jobs.append((f"{case.name}/{dtype}", job))
    return jobs


@pytest.mark.parametrize("backend,device", _params())
def test_concurrent_calls_match_lone_calls(backend, device):
    jobs = _jobs(backend, device)
    expected = {name: job() for name, job in jobs}
    start = threading.Barrier(N_THREADS)

    def worker(k):
        start.wait()
        results = []
        for r in range(ROUNDS):
            # each thread walks the jobs in its own order, so different ops overlap
            for name, job in jobs[k:] + jobs[:k]:
                results.append((name, job()))
        return results

    with ThreadPoolExecutor(N_THREADS) as pool:
        per_thread = list(pool.map(worker, range(N_THREADS)))
    checked = 0
    for results in per_thread:
        for name, got in results:
            want = expected[name]
            assert got.keys() == want.keys(), name
            for key in want:
                assert bits_equal(got[key], want[key]), f"{name}: {key} differs from a lone call"
                checked += 1
    assert checked >= N_THREADS * ROUNDS * len(jobs)


@pytest.fixture
def record_backends(monkeypatch):
    """Records, per thread, the backend module each public op call went to."""
    seen: list[tuple[int, str]] = []
    real = ops.backend_module

    def recording(name):
        seen.append((threading.get_ident(), name))
        return real(name)

    monkeypatch.setattr(ops, "backend_module", recording)
    return seen


def test_use_backend_is_per_thread(record_backends, monkeypatch):
    """Thread A sits inside use_backend("reference") while thread B calls with the default:
    B runs native, A runs reference, and B's view never changes while A's block is open."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    h, s, a = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), torch.tensor(0.3)
    a_inside, b_done, a_done = threading.Event(), threading.Event(), threading.Event()
    report = {}

    def thread_a():
        with kk.use_backend("reference"):
            a_inside.set()
            report["a_before"] = kk.current_backend()
            kk.blend_add(h, s, a)
            b_done.wait(30)
            report["a_after"] = kk.current_backend()
            kk.blend_add(h, s, a)
        report["a_outside"] = kk.current_backend()
        report["a_ident"] = threading.get_ident()
        a_done.set()

    def thread_b():
        a_inside.wait(30)
        report["b"] = kk.current_backend()
        report["b_resolved"] = kk.resolve_backend(h)
        kk.blend_add(h, s, a)
        report["b_ident"] = threading.get_ident()
        b_done.set()

    ta, tb = threading.Thread(target=thread_a), threading.Thread(target=thread_b)
    ta.start(), tb.start()
    ta.join(60), tb.join(60)
    assert a_done.is_set() and b_done.is_set(), "threads did not finish"
    assert report["a_before"] == report["a_after"] == "reference"
    assert report["a_outside"] == "auto"
    assert report["b"] == "auto" and report["b_resolved"] == "native"
    by_thread = {}
    for ident, name in record_backends:
        by_thread.setdefault(ident, set()).add(name)
    assert by_thread[report["a_ident"]] == {"reference"}
    assert by_thread[report["b_ident"]] == {"native"}


def test_a_new_thread_does_not_inherit_a_block(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    seen = []
    with kk.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(kk.current_backend()))
        t.start()
        t.join(30)
        assert kk.current_backend() == "reference"
    assert seen == ["auto"]


def test_a_block_left_by_an_exception_leaves_nothing_behind(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)

    def body():
        with pytest.raises(RuntimeError, match="boom"):
            with kk.use_backend("reference"):
                with kk.use_backend("native"):
                    raise RuntimeError("boom")
        return kk.current_backend()

    with ThreadPoolExecutor(1) as pool:  # the same worker thread runs both calls
        assert pool.submit(body).result() == "auto"
        assert pool.submit(kk.current_backend).result() == "auto"
    assert kk.current_backend() == "auto"


def test_module_state_is_settled_at_import():
    """The module-level caches hold availability facts only, complete after import: calls
    from any thread read them and never add to them."""
    before = (dict(backends._status_cache), dict(backends._auto_cache), dict(backends._modules))
    h = torch.randn(2, 3)
    # every backend that can run concurrently here (not Triton's CPU interpreter, see above)
    names = [n for n in kk.available_backends("cpu") if n != "triton"]

    def calls():
        for name in names:
            kk.blend_add(h, h.clone(), torch.tensor(0.5), backend=name)
        kk.blend_add(h, h.clone(), torch.tensor(0.5))

    with ThreadPoolExecutor(N_THREADS) as pool:
        for f in [pool.submit(calls) for _ in range(N_THREADS)]:
            f.result()  # re-raises a thread's exception here
    after = (dict(backends._status_cache), dict(backends._auto_cache), dict(backends._modules))
    assert after[0] == before[0]
    assert after[2].keys() == before[2].keys()
    # (other tests in this process may have resolved "auto" for other device types, e.g. meta)
    assert after[1] == before[1] and after[1]["cpu"] == kk.resolve_backend(h)
