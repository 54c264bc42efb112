"""Threads, thread limits, the GIL and interrupts."""

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastattn
from fastattn import _dispatch, _run

OPENMP = _dispatch.kernels.build_info()["openmp"]


def _inputs(seed, n=96):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 3, n, 32)), rng.standard_normal((2, 3, n + 7, 32)),
            rng.standard_normal((2, 3, n + 7, 16)))


def _work(seed):
    q, k, v = _inputs(seed)
    x = np.random.default_rng(seed).standard_normal((40, 33))
    return (fastattn.attention(q, k, v, causal=bool(seed % 2)), fastattn.softmax(x),
            fastattn.log_softmax(x, axis=0), fastattn.project(x, np.ones((33, 5))),
            fastattn.scores(q, k))


def test_many_python_threads_get_the_serial_results():
    seeds = list(range(48))
    serial = [_work(s) for s in seeds]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(_work, seeds))
    for s, a, b in zip(seeds, serial, concurrent):
        for x, y in zip(a, b):
            assert np.array_equal(x, y), f"seed {s}"
    assert _run.serial_blas._depth == 0  # every BLAS hold was released


@pytest.mark.timing
def test_the_gil_is_released_during_a_long_kernel():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 8, 1024, 64), dtype=np.float32)
    fastattn.attention(q, q, q)
    t = time.perf_counter()
    fastattn.attention(q, q, q, num_threads=1)
    one_call = time.perf_counter() - t
    calls = max(1, int(0.3 / one_call))
    done = threading.Event()

    def long_work():
        for _ in range(calls):
            fastattn.attention(q, q, q, num_threads=1)
        done.set()

    worker = threading.Thread(target=long_work)
    ticks = 0
    worker.start()
    while not done.is_set():  # pure Python: runs only while the worker does not hold the GIL
        ticks += 1
    worker.join()
    # With the GIL held through each call, this loop would get a few switch intervals
    # (5 ms each) at most; released, it spins throughout (millions of iterations).
    assert ticks > 100_000, ticks


def test_num_threads_is_honoured():
    q = np.ones((1, 8, 512, 64))
    for n in (1, 2):
        fastattn.attention(q, q, q, num_threads=n)
        # OpenMP gives the team asked for (no dynamic adjustment); a build without it, one.
        assert _run.last_call.threads == (n if OPENMP else 1)
    fastattn.attention(q[:, :, :4], q[:, :, :4], q[:, :, :4], num_threads=2)
    assert _run.last_call.threads == 1  # too small to be worth a second thread


def test_threadpoolctl_limits_are_honoured():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    q = np.ones((1, 8, 512, 64))
    default = _dispatch.kernels.max_threads()
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert _dispatch.kernels.max_threads() == 1
        fastattn.attention(q, q, q)
        assert _run.last_call.threads == 1
    assert _dispatch.kernels.max_threads() == default


def test_omp_num_threads_is_honoured():
    code = ("import numpy as np, fastattn; from fastattn import _run, _dispatch; "
            "q = np.ones((1, 8, 512, 64)); fastattn.attention(q, q, q); "
            "print(_dispatch.kernels.max_threads(), _run.last_call.threads)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["1", "1"], out


@pytest.mark.skipif(not hasattr(signal, "raise_signal"), reason="needs signal.raise_signal")
def test_keyboard_interrupt_during_a_long_call_leaves_everything_usable():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread")
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 8, 1024, 64), dtype=np.float32)
    expected = fastattn.attention(q, q, q)
    blas_before = [lib.num_threads for lib in _run.serial_blas._controllers()]
    # Python's own SIGINT handler, even where this process was started with SIGINT ignored
    # (a background job of a non-interactive shell, as CI may run it).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        timer = threading.Timer(0.01, signal.raise_signal, args=(signal.SIGINT,))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            for _ in range(1000):  # long enough that the signal lands during a call
                fastattn.attention(q, q, q)
        timer.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert _run.serial_blas._depth == 0
    assert [lib.num_threads for lib in _run.serial_blas._controllers()] == blas_before
    assert np.array_equal(fastattn.attention(q, q, q), expected)
