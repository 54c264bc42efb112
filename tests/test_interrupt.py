"""Ctrl-C: a long call returns to Python with KeyboardInterrupt soon after SIGINT.

Each test runs the call in a subprocess and sends it SIGINT mid-call. The proof that the
call was interrupted (rather than finishing, with Python raising KeyboardInterrupt only
afterwards) does not depend on timing: ``out=`` starts as NaN and some of it must still be
NaN when KeyboardInterrupt arrives. The child also checks that its inputs are untouched and
that the library still gives exact results afterwards. The time from the signal to the
KeyboardInterrupt is printed (``pytest -s``) and held to a loose bound only: speed is the
benchmarks' business, and the sanitizer builds run the same tests.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGINT to a subprocess")

CHILD = textwrap.dedent(r"""
    import hashlib, signal, sys, time
    import numpy as np
    import fastattn

    # Python installs its KeyboardInterrupt handler only when SIGINT is not ignored at
    # start-up, and a background job of a non-interactive shell (as CI may run this)
    # starts with SIGINT ignored: install it, as an interactive session has it.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    kind = sys.argv[1]
    rng = np.random.default_rng(0)
    if kind == "attention":
        # 2.2 TFLOP: tens of seconds on 2 cores.
        args = [rng.standard_normal((1, 8, 32768, 64), dtype=np.float32) for _ in range(3)]
        out = np.full((1, 8, 32768, 64), np.nan, np.float32)
        call = lambda: fastattn.attention(*args, out=out)
    elif kind == "bfloat16":
        # The same shape on the bfloat16 path (the matrix engine where there is one).
        import ml_dtypes
        bf16 = ml_dtypes.bfloat16
        args = [rng.standard_normal((1, 8, 32768, 64), dtype=np.float32).astype(bf16)
                for _ in range(3)]
        out = np.full((1, 8, 32768, 64), np.nan, bf16)
        call = lambda: fastattn.attention(*args, out=out)
    else:
        # 1.1 TFLOP, 768 MiB.
        args = [rng.standard_normal((8192, 8192), dtype=np.float32) for _ in range(2)]
        out = np.full((8192, 8192), np.nan, np.float32)
        call = lambda: fastattn.project(*args, out=out)
    digest = lambda: [hashlib.sha256(a.view(np.uint8).data).hexdigest() for a in args]
    before = digest()
    print("ready", flush=True)
    try:
        call()
        print("finished", flush=True)
    except KeyboardInterrupt:
        when = time.monotonic()
        assert digest() == before, "inputs changed"
        left = int(np.isnan(out.astype(np.float32)).sum())
        # The library still works, exactly: the worked example of the tutorial.
        x = np.array([0.2, 0.7, 0.4])
        w_q = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
        w_k = np.array([[0.3, 0.1, 0.5], [0.6, 0.4, 0.2], [0.9, 0.7, 0.8]])
        w_v = np.array([[0.5, 0.6, 0.7], [0.1, 0.2, 0.3], [0.9, 0.8, 0.4]])
        got = fastattn.self_attention(x, w_q, w_k, w_v).round(12).tolist()
        assert got == [0.53, 0.58, 0.51], got
        print("interrupted", when, left, out.size, flush=True)
""")


@pytest.mark.timing
@pytest.mark.parametrize("kind", ["attention", "bfloat16", "project"])
def test_sigint_interrupts_a_long_call(kind):
    if kind == "bfloat16":
        pytest.importorskip("ml_dtypes")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    child = subprocess.Popen([sys.executable, "-c", CHILD, kind], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # well inside the call
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=600)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, stderr
    assert "finished" not in stdout, "the call ran to its end: SIGINT did not interrupt it"
    _, when, left, size = stdout.split()
    latency = float(when) - sent
    print(f"\n{kind}: KeyboardInterrupt {latency * 1e3:.0f} ms after SIGINT; "
          f"{int(left)} of {int(size)} output elements never written")
    # Interrupted mid-call: part of out= was never written.
    assert 0 < int(left) <= int(size)
    assert latency < 5.0
