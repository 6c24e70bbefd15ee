"""Which modules and functions of this project one remote ``insert`` runs through.

A newcomer following a request needs to know how many files it crosses; this
counts them instead of guessing. It starts a worker pool in this process (built
as the command builds its own), against a scratch database and vhost on the
local services, puts one product through a ``DataSpace`` with
``RemoteDataSource`` to warm every path up, then records the project's functions
called by every thread (callers, the client's I/O thread, the worker's I/O and
database threads) while one more ``DataBlock.put`` of a new key runs, and prints
them by module, in the order first called.

    .venv/bin/python bench/insert_path.py            # modules, and functions per module
    .venv/bin/python bench/insert_path.py --modules  # the modules only

Two counts: the modules on the call stack wherever the request changes hands
(a publish, an ack, a hand-over between threads) or reaches the database (a
statement), leaving out the I/O threads' connection loops at the bottom of their
stacks: the path a reader follows; and every module that runs a function for
the request, checks and helpers included.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataspace_client import DataBlock, DataSpace  # noqa: E402
from tests import services  # noqa: E402
from tests.support.configs import remote_config  # noqa: E402

PACKAGES = ("core/", "client/", "worker/")
#: modules a request passes through for bookkeeping only: counters and log helpers
BESIDE = {"worker/dataspace_worker/metrics.py", "worker/dataspace_worker/logs.py"}

#: where the request changes hands or reaches the database: a publish or an ack
#: (pika), a hand-over between threads (a queue's put, an event set), a statement
HAND_OVERS = {"basic_publish", "basic_ack", "put", "set", "add_callback_threadsafe"}

#: the I/O threads' loops: at the bottom of every stack on those threads, they run
#: connections, not the request
THREAD_LOOPS = {
    ("core/dataspace_core/amqp/reconnect.py", "run"),
    ("worker/dataspace_worker/worker_pool.py", "_run"),
    ("worker/dataspace_worker/pool_connection.py", "run"),
    ("client/dataspace_client/rpc/channel.py", "run"),
}
#: modules whose hand-overs are not the request's (a connection back to its pool)
NOT_THE_REQUEST = {"worker/dataspace_worker/db_pool.py"}

_calls: dict[str, list[str]] = {}
#: the project's modules on the call stack at a hand-over, in the order first seen
_spine: dict[str, None] = {}
_recording = threading.Event()


def _module(frame) -> str | None:
    path = frame.f_code.co_filename
    if not path.startswith(str(ROOT)):
        return None
    relative = path[len(str(ROOT)) + 1 :]
    return relative if relative.startswith(PACKAGES) else None


def _note_stack(frame) -> None:
    if _module(frame) in NOT_THE_REQUEST:
        return
    stack = []
    while frame is not None:
        module = _module(frame)
        if module is not None and (module, frame.f_code.co_name) not in THREAD_LOOPS:
            stack.append(module)
        frame = frame.f_back
    for module in reversed(stack):
        _spine.setdefault(module, None)


def _profile(frame, event, arg):
    if not _recording.is_set():
        return
    if event == "c_call" and getattr(arg, "__name__", "") == "execute":
        _note_stack(frame)  # a statement: psycopg2's cursor.execute is C
        return
    if event != "call":
        return
    module = _module(frame)
    if module is None:
        if frame.f_code.co_name in HAND_OVERS and _module(frame.f_back) is not None:
            _note_stack(frame.f_back)
        return
    names = _calls.setdefault(module, [])
    name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
    if name not in names:
        names.append(name)


def _trace_one_insert(url: str, dsn: str) -> None:
    threading.setprofile(_profile)  # every thread started from now on
    sys.setprofile(_profile)
    with services.running_pool(url, dsn, consumers=1, prefetch=1):
        with DataSpace(remote_config(url, timeout=20)) as space:
            manager, manager_id = f"insert-path-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
            space.store_taskmanager(manager, manager_id)
            block = DataBlock(space, manager, manager_id, 1)
            block.put("warm", {"cpus": 4}, _header(block))
            time.sleep(0.2)
            _recording.set()
            block.put("resources", {"cpus": 8}, _header(block))
            time.sleep(0.2)  # the worker's settling after the reply
            _recording.clear()
    sys.setprofile(None)
    threading.setprofile(None)


def _header(block):
    from dataspace_client import Header

    return Header(block.taskmanager_id, create_time=time.time(), creator="insert_path")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", action="store_true", help="print the modules only")
    args = parser.parse_args()
    with (
        services.scratch_database(services.DEFAULT_PG_DSN) as dsn,
        services.scratch_vhost(services.DEFAULT_AMQP_URL) as url,
    ):
        _trace_one_insert(url, dsn)
    followed = [m for m in _calls if m not in BESIDE]
    print(
        f"one insert: {len(_spine)} modules on the call stack where it changes hands or "
        f"reaches the database; {len(followed)} modules run a function for it"
    )
    print("the hand-over path:")
    for module in _spine:
        print(f"  {module}")
    print("every module that runs a function for it:")
    for module, names in _calls.items():
        mark = "  (bookkeeping)" if module in BESIDE else ""
        if args.modules:
            print(f"  {module}{mark}")
        else:
            print(f"  {module}{mark}: {', '.join(names)}")


if __name__ == "__main__":
    main()
