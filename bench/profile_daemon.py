"""Run the ``pyvduse`` command with cProfile in every thread; merged pstats saved at exit.

``python -m cProfile -m pyvduse ...`` sees only the main thread, which just waits for a
signal: the data path runs in one worker thread per virtqueue (and the control thread
answers the kernel). This wraps every thread's run() in its own profiler and merges them
all, main thread included, into one pstats file once the daemon has stopped (SIGTERM), and
the queue workers' threads alone (the data path, without the other threads' idle waits)
into OUT.workers:

    python bench/profile_daemon.py OUT.pstats blk --name x --null 1G
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
from typing import Any

from pyvduse.cli.main import main as pyvduse_main


def main(argv: list[str]) -> int:
    out, args = argv[0], argv[1:]
    profiles: list[tuple[str, cProfile.Profile]] = []
    lock = threading.Lock()
    original_run = threading.Thread.run

    def profiled_run(self: threading.Thread, *a: Any, **kw: Any) -> None:
        prof = cProfile.Profile()
        with lock:
            profiles.append((self.name, prof))
        prof.enable()
        try:
            original_run(self, *a, **kw)
        finally:
            prof.disable()

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    main_prof = cProfile.Profile()
    main_prof.enable()
    try:
        return pyvduse_main(args)
    finally:
        main_prof.disable()
        stats = pstats.Stats(main_prof)
        workers: pstats.Stats | None = None
        with lock:
            for name, prof in profiles:  # the daemon joined its workers before returning
                stats.add(prof)
                if name.startswith("vq"):
                    if workers is None:
                        workers = pstats.Stats(prof)
                    else:
                        workers.add(prof)
        stats.dump_stats(out)
        if workers is not None:
            workers.dump_stats(out + ".workers")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
