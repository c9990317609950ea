"""This machine's memory read bandwidth, measured with a TVM read kernel over an array much larger than the
caches, split over T cores: the ceiling of a memory-bound kernel (decode's roofline in `bench`, each
memory-bound kernel's fraction of it in `tune`)."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import numpy as np

from .errors import UserError

LANES, UNROLL = 16, 4  # uint32 lanes per load (one 512-bit vector; two 256-bit ones on AVX2), loads in flight


PROBE_PREFETCH = (0, 8192)  # bytes of software prefetch (into L2) ahead of the loads; the best one counts


def _read_kernel(words: int, threads: int, prefetch: int = 0):
    """A TVM kernel that reads `words` uint32 in `threads` contiguous parts, XOR-folding them into UNROLL
    independent vectors per part: the loads a decode GEMV issues without any of its arithmetic, with a
    software prefetch `prefetch` bytes ahead (one per 64-byte line, into L2) when not 0."""
    from tvm.script import tirx as T

    per = words // threads
    steps = per // (LANES * UNROLL)

    @T.prim_func
    def main(a: T.Buffer((words,), "uint32"), out: T.Buffer((threads * LANES,), "uint32")):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(threads):
            acc = T.alloc_buffer((UNROLL * LANES,), "uint32")  # global scope, small: on the stack
            for u in T.unroll(UNROLL):
                acc[T.ramp(u * LANES, 1, LANES)] = T.broadcast(T.uint32(0), LANES)
            for i in range(steps):
                if prefetch > 0:  # LANES * UNROLL words = 4 lines per step
                    for u in T.unroll(UNROLL):
                        T.evaluate(
                            T.call_llvm_intrin(
                                "void",
                                "llvm.prefetch.p0",
                                T.address_of(
                                    a[T.min(t * per + (i * UNROLL + u) * LANES + prefetch // 4, words - 1)]
                                ),
                                0,
                                2,
                                1,
                            )
                        )
                for u in T.unroll(UNROLL):
                    acc[T.ramp(u * LANES, 1, LANES)] = (
                        acc[T.ramp(u * LANES, 1, LANES)]
                        ^ a[T.ramp(t * per + (i * UNROLL + u) * LANES, 1, LANES)]
                    )
            for j in range(LANES):
                out[t * LANES + j] = acc[j] ^ acc[LANES + j] ^ acc[2 * LANES + j] ^ acc[3 * LANES + j]

    return main


@functools.cache
def _read_kernels(words: int, threads: int) -> list:
    """The probe built for this CPU, once per size and thread count (`phi3 tune` probes per kernel)."""
    import tvm

    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    return [
        tvm.compile(tvm.IRModule({"main": _read_kernel(words, threads, pf)}), target=target)["main"]
        for pf in PROBE_PREFETCH
    ]


def _ones(words: int) -> np.ndarray:
    """The probe's array, all ones, on huge pages where the system offers them: the engine keeps the
    weights there (toolkit/hugepages.py), and a stream over 4 KiB pages reads slower (a TLB walk per
    page), which would put the ceiling below what the weights can be read at."""
    from .hugepages import huge_pages_available, huge_region

    if not huge_pages_available():
        return np.ones(words, dtype=np.uint32)
    a = huge_region(words * 4).view(np.uint32)
    a[:] = 1
    return a


class ReadProbe:
    """The probe built and its array filled once, for repeated passes: `bench` pairs each decode step with
    one (the machine's bandwidth drifts within seconds on shared hosts, so a single figure taken minutes
    before a run says little about it). TVM's thread pool must have `threads` threads (TVM_NUM_THREADS,
    read when the pool starts)."""

    def __init__(self, threads: int = 1, nbytes: int = 1 << 30) -> None:
        import tvm

        if threads < 1:
            raise UserError(f"threads must be >= 1, got {threads}")
        pool = int(tvm.get_global_func("runtime.NumThreads")())
        if pool < threads:  # TVM sizes its pool once, from TVM_NUM_THREADS (else half the CPUs on some hosts)
            raise RuntimeError(f"TVM's thread pool has {pool} thread(s), not {threads}: set TVM_NUM_THREADS")
        self.words = nbytes // 4 // (threads * LANES * UNROLL) * (threads * LANES * UNROLL)
        self._reads = _read_kernels(self.words, threads)
        dev = tvm.cpu()
        self._a = tvm.runtime.from_dlpack(_ones(self.words))  # every page touched now
        self._out = tvm.runtime.empty((threads * LANES,), "uint32", dev)
        for read in self._reads:  # first calls: thread pool start, code paged in
            read(self._a, self._out)

    def rate(self) -> float:
        """One pass of each probe variant, back to back: the faster one's bytes/s."""
        best = 0.0
        for read in self._reads:
            t0 = time.perf_counter()
            read(self._a, self._out)
            best = max(best, self.words * 4 / (time.perf_counter() - t0))
            if not np.all(self._out.numpy() == 0):  # an even number of ones per lane: the loads really ran
                raise RuntimeError("bandwidth probe read wrong data")
        return best


def paired_fractions(
    rates: Sequence[float], seconds: Sequence[float], nbytes: int | Sequence[int] | np.ndarray
) -> np.ndarray:
    """Per timing, the fraction of the bandwidth it reached: `nbytes` (or `nbytes[i]`) read in `seconds[i]`,
    over the mean of the probe passes just before and after it (`rates[i]`, `rates[i + 1]`; len(rates) ==
    len(seconds) + 1).
    On a shared host the ceiling moves by 2x within seconds (`bench.pairing`), so each timing is judged
    against the passes that bracket it, not against one figure taken minutes apart."""
    r, t = np.asarray(rates, dtype=float), np.asarray(seconds, dtype=float)
    if len(r) != len(t) + 1:
        raise ValueError(f"{len(t)} timings need {len(t) + 1} probe passes around them, got {len(r)}")
    return np.asarray(nbytes, dtype=float) / t / ((r[:-1] + r[1:]) / 2)


def measure_read_bandwidth(threads: int = 1, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-`repeats` read bandwidth in bytes/s of `threads` cores streaming `nbytes` (a TVM kernel
    built for this CPU: wide loads, several in flight per core, as the decode kernels issue them).

    The best, not the median: the roofline is the ceiling the machine allows, and neighbours only lower it.
    A numpy sum split over Python threads measured a third less than this on AMD Zen 4/5, less than
    decode itself moved, so it is not used. The kernel runs without and with a software prefetch
    (`PROBE_PREFETCH`), interleaved so that a drift in the machine's bandwidth meets both alike: on Zen 4
    the decode GEMVs, which prefetch, read faster than the plain loop."""
    probe = ReadProbe(threads, nbytes)
    return max(probe.rate() for _ in range(repeats))
