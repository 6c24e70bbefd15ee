"""The argument checks of every operation, shared by both backends so that they
raise the same errors.

The remote client runs them before it sends anything (a bad call fails fast and
costs no round trip); the worker runs them again on what it receives, because it
never trusts a message. Which parameters an operation has, and the check of
each, is ``catalog.CATALOG``; the checks of single values are in ``checks.py``
(their names are importable from here too, as they always were).
"""

from __future__ import annotations

from typing import Any

from .catalog import CATALOG, Check
from .checks import (  # noqa: F401 - this module's names before checks.py existed
    BIGINT_MAX,
    HEADER_FIELDS,
    INT_MAX,
    MAX_DAYS,
    MAX_KEYS_PER_CALL,
    MAX_TEXT_BYTES,
    MAX_UUID_CHARS,
    METADATA_FIELDS,
    METADATA_STATES,
    TABLES,
    blob,
    days,
    flag,
    generation_id,
    header,
    key,
    keys,
    metadata,
    moment,
    name,
    sequence_id,
    table,
    taskmanager_uuid,
    text,
)

#: operation -> {parameter: check}; parameters in call order
SIGNATURES: dict[str, dict[str, Check]] = {
    operation: dict(spec.checks) for operation, spec in CATALOG.items()
}


def check(operation: str, args: dict[str, Any]) -> dict[str, Any]:
    """Validate and normalize the arguments of one call, by parameter name.

    Raises TypeError/ValueError as the in-process store would.
    """
    return {param: checker(args[param]) for param, checker in SIGNATURES[operation].items()}
