"""The training process's memory: glibc's malloc settings (one home for the rule and its
measurement) and the peak resident size it reports.

glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after
which blocks of activation size come from the heap, and a heap fragmented by a
training step's mix of sizes keeps its freed pages. Measured on the bundled model (one
training step, 8 sequences of at most 512 tokens, fp32, peak resident size above the
loaded model; `python -m rpo_app bench --only memory`): 12.3 GB with glibc's defaults,
8.7 GB with blocks of 4 MB and more always mapped (and unmapped, returned, when freed).
A 16 MB threshold kept most of the heap (9.4 GB against 5.8 GB for 4 MB, in an earlier
calibration on full 512-token sequences).

The opposite setting, freed memory kept in the heap (no mmap, no trimming), was measured
and left out. Each mapped block is faulted in again, 4 KiB at a time, when it is next
allocated, and on a 2-core Xeon VM a fault cost 10-37 us: training steps of 8 pairs under
glibc's defaults took up to 740,000 faults and 7.8 s of kernel time in an 11 s step. Kept,
the informative order's scoring in the app ran 1.11x faster (60.4 against 66.8 s), but
the default run's 40 steps not at all (113.6 against 112.7 s mapped), and glibc's
posix_memalign, which torch allocates with, does not reuse a freed block at once: one
64 MB tensor allocated and freed 40 times grew the process to 1.2 GB before the faults
stopped. Transparent huge pages (torch's THP_MEM_ALLOC_ENABLE) were slower on that VM.

Measured again on another 2-core Xeon VM with AMX (December 7), with LoRA on the top
half and the frozen layers' states kept: a default run's 40 steps took 78.5 s kept
against 104.9 s mapped (peak 4.40 GB against 3.74), and the reference pass 8.3 s
against 18.8 s. So the steps keep freed memory (`kept_heap`) where twice their planned
memory fits (runestimate.KEPT_HEAP_FACTOR), and scoring always does, each trimmed after.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import resource
import sys
import threading

log = logging.getLogger(__name__)

# mallopt's parameter numbers (malloc.h) and glibc's defaults for the last two.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD = 4 << 20
DEFAULT_TRIM_THRESHOLD = 128 << 10
DEFAULT_MMAP_MAX = 65536


@functools.cache
def _glibc():
    """glibc's mallopt and malloc_trim, or None (musl, macOS, Windows); looked up once."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's soname; musl has another
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return mallopt, trim


def map_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve blocks of `threshold` bytes and more by mmap from now on, so that freeing one
    gives its memory back. Whether it took: only glibc has mallopt (not musl, macOS or
    Windows), and there this does nothing."""
    libc = _glibc()
    if libc is None:
        return False
    done = libc[0](M_MMAP_THRESHOLD, threshold) == 1
    if not done:
        log.info("glibc's mallopt refused an mmap threshold of %d bytes", threshold)
    return done


_kept = {"depth": 0}
_kept_lock = threading.Lock()


@contextlib.contextmanager
def kept_heap():
    """Inside the block, freed memory stays in the heap for the next allocation (no mmap,
    no trimming); after it, the heap is trimmed and blocks are mapped as before. Blocks
    nest: the outermost one decides. Process-wide, so for the training process only.

    For passes that allocate the same sizes layer after layer and batch after batch:
    mapped, each such block is faulted in again, 4 KiB at a time. Measured on a 2-core
    Xeon with AMX (December 7, the bundled model, 64 sequences of 220 tokens in batches
    of 8, bf16 autocast, 2 threads): a scoring loop took 9.9 s with 3.5 million page
    faults mapped (6.2 s of it in the kernel), 5.5 s with 2,333 kept; the trainer's
    reference pass over 14,069 tokens 18.8 s mapped, 8.3 s kept. Does nothing where
    there is no glibc."""
    libc = _glibc()
    if libc is None:
        yield
        return
    mallopt, trim = libc
    with _kept_lock:
        _kept["depth"] += 1
        if _kept["depth"] == 1:
            mallopt(M_MMAP_MAX, 0)
            mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
    try:
        yield
    finally:
        with _kept_lock:
            _kept["depth"] -= 1
            if _kept["depth"] == 0:
                mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                trim(0)


def peak_resident_gb() -> float:
    """This process's largest resident size so far (GB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # macOS: bytes; Linux: KiB


def free_memory_gb(device) -> float:
    """Memory a training step can still take (GB): the GPU's free memory on a CUDA
    device, else the system's available memory (free plus reclaimable cache)."""
    import psutil
    import torch

    if getattr(device, "type", str(device).split(":")[0]) == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 1e9
    return psutil.virtual_memory().available / 1e9
