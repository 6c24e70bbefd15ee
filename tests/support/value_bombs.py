"""zlib bombs (streams that inflate to far more than their size) and a process's peak
RSS, for the tests of bounded reads (tests/test_value_bounds.py). Plain functions of
no test module, so that a fresh interpreter the tests start can import them."""

from __future__ import annotations

import zlib

MiB = 1024 * 1024


def _bomb(prefix: bytes, unit: bytes, mib: int, suffix: bytes) -> bytes:
    """A zlib stream of ``prefix + unit * ... + suffix``, ``mib`` MiB inflated, built
    without holding it inflated."""
    packer = zlib.compressobj(9)
    block = unit * (MiB // len(unit))
    out = [packer.compress(prefix)]
    out += [packer.compress(block) for _ in range(mib)]
    out.append(packer.compress(suffix) + packer.flush())
    return b"".join(out)


def string_bomb(mib: int) -> bytes:
    return _bomb(b"{'pickled': False, 'value': {'a': '", b"a", mib, b"'}}")


def items_bomb(mib: int) -> bytes:
    return _bomb(b"{'pickled': False, 'value': {'a': [", b"0,", mib, b"]}}")


def peak_rss_mib() -> float:
    """This process's peak RSS in MiB since its exec (VmHWM). Not ``ru_maxrss``: Linux
    carries that over an exec, so a child of a large pytest process reports the
    parent's size."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
