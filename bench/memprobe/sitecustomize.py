"""Bench-only memory probe, loaded into a server process through PYTHONPATH (never imported by gateway/).

With BENCH_TRACEMALLOC_DIR set, starts tracemalloc at interpreter start-up and writes a snapshot to
that directory on every SIGUSR1; bench/fanout.py --memprobe compares two of them (before and after the
idle connections) to attribute the per-connection memory to source lines.
"""

import os

if os.environ.get("BENCH_TRACEMALLOC_DIR"):
    import itertools
    import signal
    import tracemalloc

    tracemalloc.start(int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "1")))
    _seq = itertools.count()

    def _dump(signum: int, frame: object) -> None:
        path = os.path.join(os.environ["BENCH_TRACEMALLOC_DIR"], f"snap-{next(_seq)}.pickle")
        tracemalloc.take_snapshot().dump(path + ".tmp")
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR1, _dump)
