"""glibc malloc tuning for the worker, applied once at start (``tune``).

Why: a large product passes through several buffers of about its size on the
way in (the AMQP body, the value, psycopg2's bytea text, the SQL text, libpq's
send buffer) and on the way out (libpq's result, the value, the reply body).
glibc gives an allocation of at least ``M_MMAP_THRESHOLD`` a mapping of its
own, returned to the system when freed; but by default that threshold is
dynamic: the first time such a block is freed it rises to that block's size
(up to 32 MiB), and from then on buffers up to 32 MiB come from the malloc
arenas (one per consumer thread), which keep what is freed. After 5 + 8
16 MiB inserts and gets on four consumers the worker stayed at 424-595 MiB;
with the threshold fixed at 4 MiB (setting it also turns the dynamic
adjustment off) at 242-248 MiB, all of it buffers still alive: libpq's send
and receive buffers of each pooled connection, which libpq never shrinks, and
the last request each consumer still references.

Why 4 MiB and not lower: 1 MiB gives the same result with 16 MiB products,
but then the 1-2 MiB buffers of 1 MiB products are mapped and unmapped on
every request, which cost 13% of the insert rate and 27% of the get rate of
1 MiB values (at 4 MiB: no measurable cost). What those keep in the arenas is
bounded (about 70 MiB over idle with four consumers) and reused.

Not set, because the measurements did not support it: ``M_ARENA_MAX`` (2: 10
to 15 MiB less after 1 MiB values, nothing with 16 MiB ones) and a periodic
``malloc_trim`` (under 10 MiB).

An operator's own setting wins: with ``MALLOC_MMAP_THRESHOLD_`` in the
environment (or ``glibc.malloc.mmap_threshold`` in ``GLIBC_TUNABLES``) the
threshold is left as glibc set it. Elsewhere than on glibc (musl, macOS) this
does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: mallopt parameter numbers, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3

#: allocations of at least this size get their own mapping, unmapped when freed
MMAP_THRESHOLD = 4 * 1024 * 1024


def _glibc():
    """The C library when it is glibc, else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # gnu_get_libc_version is glibc's own; musl and others have no such symbol
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def _set_by_operator(environ) -> bool:
    return "MALLOC_MMAP_THRESHOLD_" in environ or "glibc.malloc.mmap_threshold" in environ.get(
        "GLIBC_TUNABLES", ""
    )


def tune(environ=None) -> dict[str, int]:
    """Fix glibc's mmap threshold; return what was set, by mallopt name.

    Call it first thing, before any thread starts. Returns ``{}`` when nothing
    was set: not glibc, or the operator set the threshold in the environment.
    """
    environ = os.environ if environ is None else environ
    libc = _glibc()
    if libc is None or _set_by_operator(environ):
        return {}
    if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return {}
    return {"M_MMAP_THRESHOLD": MMAP_THRESHOLD}
