"""``dataspace``: the operator's command.

    dataspace status [-j]                            # broker, queues, consumers, warnings
    dataspace dead list [-n N] [-j] [FILTERS]        # dead letters, left in place
    dataspace dead replay [-n N] [-y] [FILTERS]      # dead letters back to the workers
    dataspace dead purge [-y] [FILTERS]              # dead letters removed for good
    dataspace dead drop MESSAGE_ID... [-y]           # the named dead letters removed
    dataspace get TM_SEQ GEN KEY [--allow-pickle]    # print one product's value
    dataspace put TM_SEQ GEN KEY '{"cpus": 4}'       # insert or update one product
    dataspace reap --now --days 30 [-j]              # one retention run, through the reaper

FILTERS (on ``dead list``, ``replay`` and ``purge``; each repeatable, a dead letter
must match every option given, any of its values): ``--message-id ID``, ``--code
CODE`` (the error code, or the broker's x-death reason such as ``delivery_limit``),
``--operation OP`` (e.g. ``insert``), ``--reason TEXT`` (a part of the reason, any
case). Options every command takes, before or after its name: ``-u/--url``
(broker URL, env ``DATASPACE_AMQP_URL``), ``--management-url`` (env
``DATASPACE_MANAGEMENT_URL``; default: the broker URL's host and credentials on
port 15672, and its vhost) and ``-t/--timeout`` (seconds; default 600 for
``reap``, 10 for ``status``, 30 otherwise).

Every command first opens an AMQP connection with the broker URL, so that one
cause gets one message and one exit code whatever the command: a refused login
is "authentication refused by the broker at URL (check the user and password)",
exit 2; a refused or silent port is "cannot reach the broker at URL: ...", exit 3.

Where each part is (one module per command group):

    parser.py        the arguments and help texts
    output.py        printing (escaped), times, progress, the operator's yes, exit codes
    broker.py        the AMQP connection, its failures in words, RemoteDataSource,
                     the management API, timeouts
    status.py        ``status``: what it collects; status_text.py: how it prints it
    dead_letters.py  how the ``dead`` commands look at dataspace.dead; the filters
    dead.py          ``dead list``, ``dead purge``, ``dead drop``
    dead_replay.py   ``dead replay``
    data.py          ``get``, ``put``
    reap.py          ``reap``

Exit codes (scripts may rely on them):

    0  done; for ``status``: healthy, nothing to look at
    1  the service failed the request; ``status`` found something unhealthy (a
       queue missing or not running, no consumer on dataspace.requests or
       dataspace.reaper); a dead letter could not be replayed; the operator
       answered no
    2  bad usage or configuration: a bad argument, authentication refused, no
       such vhost or no permission on it, a TLS certificate refused, the
       management API refused the user, no such queue
    3  the broker or the management API could not be reached (connection
       refused, no answer in time)
    4  not found: ``get`` of a product that does not exist, ``put`` into a task
       manager that does not exist, ``dead drop`` of a message_id not there
    5  ``status``: healthy, with warnings (dead letters wait in dataspace.dead)
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import sys
import time

from dataspace_core.amqp.addresses import broker_addresses
from dataspace_core.errors import (
    DataSpaceConfigurationError,
    DataSpaceConnectionError,
    DataSpaceError,
    DataSpaceTimeoutError,
)

from .data import _get, _put
from .dead import _dead_drop, _dead_list, _dead_purge
from .dead_replay import _dead_replay
from .output import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    _error,
    _reader_gone,
)
from .parser import _parser
from .reap import _reap
from .status import _status

__all__ = ["main"]


COMMANDS = {
    "status": _status,
    "get": _get,
    "put": _put,
    "reap": _reap,
}
DEAD_COMMANDS = {
    "list": _dead_list,
    "replay": _dead_replay,
    "purge": _dead_purge,
    "drop": _dead_drop,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "dead":
        command = DEAD_COMMANDS[args.dead_command]
    else:
        command = COMMANDS[args.command]
    started = time.monotonic()
    try:
        # a URL that cannot be used is said once, without its password, for every command
        broker_addresses(args.url)
    except ValueError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    try:
        code = command(args)
        sys.stdout.flush()  # a reader gone (| head) is found here, not at exit
        return code
    except DataSpaceConfigurationError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    except (DataSpaceConnectionError, DataSpaceTimeoutError) as exc:
        _error(str(exc))
        return EXIT_UNREACHABLE
    except (DataSpaceError, KeyError, ValueError, TypeError) as exc:
        _error(f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _error(f"interrupted after {time.monotonic() - started:.1f} s")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # piped into head, say: the reader has what it wanted
        _reader_gone()
        return EXIT_OK
