"""OpenMP teams when the model runs on another thread than the one that loaded it.

libgomp (the one torch loads; the project's extensions link the same soname, so a process has
one) gives each thread that opens a parallel region its own team of workers, kept for the
thread's life. Between regions a team's idle workers spin, and so answer the next region at
once, only while the process's OpenMP-managed threads do not outnumber its CPUs; past that they
spin ~100 times and sleep, and every region then waits for a futex wake. A server that loads
the model on its main thread (a team there) and runs it on an engine thread (a second team) is
past that on a 2-core machine: measured on a Zen 4, 30 layers of a batch-16 decode step's
linears took 24-26 ms on the engine thread against 14-15 ms when the main thread's team was
released first, and a whole batch-16 SmolLM2 step 58-67 ms against 38-46 ms on the main thread.

So a worker process keeps one team: the thread that loaded the model `hand_over()`s (its team
exits, and it opens none again), helper threads that run torch ops are `single()`, the thread
that runs the model sets its own count (`torch.set_num_threads`), and a thread that ran one
forward among others (the prefill worker's) `release()`s its team after it. Where libgomp is not
loaded (another OpenMP runtime, no /proc), these do nothing.
"""

from __future__ import annotations

import ctypes
import functools

import torch

_OMP_PAUSE_SOFT = 1


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """torch's libgomp (soname libgomp.so.1, already mapped into the process), or None. Other
    copies under other names (sentencepiece's wheel ships one) are not the one torch uses."""
    try:
        with open("/proc/self/maps") as maps:
            mapped = any(ln.rstrip().endswith("/libgomp.so.1") for ln in maps)
    except OSError:
        return None
    return ctypes.CDLL("libgomp.so.1") if mapped else None  # the loaded one, by its soname


def single() -> None:
    """The calling thread's torch ops and OpenMP regions run on it alone from now on (a
    helper thread's: it opens no team). torch sets a thread's OpenMP count on its first
    parallel op, so that is forced first and overridden after."""
    lib = _libgomp()
    if lib is not None:
        torch.get_num_threads()  # torch's per-thread init: sets the count we override
        lib.omp_set_num_threads(1)


def release() -> None:
    """The calling thread's idle team exits (its next region starts a new one): for a thread
    that ran one forward and may run none for a while, so that the one that runs the next keeps
    the only team."""
    lib = _libgomp()
    if lib is not None:
        lib.omp_pause_resource_all(_OMP_PAUSE_SOFT)


def hand_over() -> None:
    """The calling thread (the one that loaded the model) releases its idle team and runs
    single-threaded from now on, leaving the CPUs' team to the thread that runs the model."""
    single()
    release()
