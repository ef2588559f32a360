"""CPython's cyclic garbage collector, set for a server whose requests make no reference cycles.

Why: perf and py-spy on the 1-worker gateway under the cost bench (issue #23: c=64, keys on) put 14% of its CPU in
the collector, about 70 µs per proxied chat request, and every collection found nothing to free. The young
generation was collected every ~13 requests (700 net allocations: a request's coroutines, frames and dicts still
alive at that moment) and every ~10th of those passes went on to the next generation; a full collection walked the
~90,000 objects that start-up leaves behind (modules, FastAPI, pydantic's schemas, loaded models) for 30-60 ms, on
the event loop, about once a second. Nothing a request allocates outlives it, and none of it forms cycles
(refcounting frees it), so that work only costs CPU and stalls.

So, once the gateway has started: one collection, then everything alive goes to the permanent generation
(`gc.freeze`: never walked again, still freed when its count drops; the factory froze the heap before the app
started, f0df47e, which left out what start-up makes: sessions, engines, eagerly loaded models), and the young
generation is collected after GEN0_THRESHOLD net allocations instead of 700 (the freeze alone left those). The collector stays on: a cycle that does appear (an error path
that keeps a traceback) is still collected, after at most that many allocations.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 10_000  # 700 is CPython's default; 10,000 took young collections from ~120 a second to ~0


def settle() -> None:
    """Called once per worker after start-up (models loaded, sessions open): see the module's docstring."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


__all__ = ["GEN0_THRESHOLD", "settle"]
