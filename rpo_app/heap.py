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
"""
from __future__ import annotations

import ctypes
import logging
import resource
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 4 << 20


def map_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve blocks of `threshold` bytes and more by mmap from now on, so that freeing one
    gives its memory back. Whether it took: only glibc has mallopt (not musl, macOS or
    Windows), and there this does nothing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc's soname; musl has another
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, threshold) == 1
    if not done:
        log.info("glibc's mallopt refused an mmap threshold of %d bytes", threshold)
    return done


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
