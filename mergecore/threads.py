"""One rule for every `--threads` flag (merge, eval, search dam, bench build-family, bench scripts).

A thread count far above the machine's cores only adds contention, and a huge one crashes:
`torch.set_num_threads(100000)` segfaults inside OpenMP. So counts below 1 are an error and
counts above `thread_cap()` are lowered to it, with a warning line saying so.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from mergecore.errors import MergeError

MAX_THREADS = 256


def thread_cap() -> int:
    """At most 4 threads per CPU of this machine, and never more than `MAX_THREADS`."""
    return max(1, min(MAX_THREADS, 4 * (os.cpu_count() or 1)))


def check_threads(value: Optional[int], flag: str = "--threads") -> Optional[int]:
    """`value` if it is sane, the cap (with a `warning:` line on stderr) if it is too large;
    None stays None (the caller's default). Values below 1 raise a one-line MergeError."""
    if value is None:
        return None
    if value < 1:
        raise MergeError(f"{flag} must be at least 1, got {value}")
    cap = thread_cap()
    if value > cap:
        print(f"warning: {flag} {value} capped to {cap} (4 per CPU, at most {MAX_THREADS})", file=sys.stderr)
        return cap
    return value


def set_torch_threads(value: Optional[int], flag: str = "--threads") -> Optional[int]:
    """`check_threads`, then give torch that many intra-op threads (None: leave torch's choice)."""
    n = check_threads(value, flag)
    if n is not None:
        import torch

        torch.set_num_threads(n)
    return n
