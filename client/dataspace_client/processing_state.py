"""The state of a Reaper, with the accessors of the decision engine's ProcessingState.

The engine's code reads a reaper's state as ``reaper.state.get()`` and waits on it
with ``wait_until``/``wait_while``; its tests stop a loop by ``state.set(OFFLINE)``.
``ProcessingState`` offers the same calls, and also compares equal to the
``State`` member it holds (``reaper.state == State.IDLE``), as this package's
earlier bare ``State`` value did.
"""

from __future__ import annotations

import enum
import multiprocessing


class State(enum.Enum):
    BOOT = "BOOT"
    IDLE = "IDLE"
    ACTIVE = "ACTIVE"
    STEADY = "STEADY"
    SHUTTINGDOWN = "SHUTTINGDOWN"
    SHUTDOWN = "SHUTDOWN"
    OFFLINE = "OFFLINE"
    ERROR = "ERROR"

    # Equal to the member of the same name of another enum named State (the
    # engine's, whose values are ints), so that code comparing a reaper's state
    # with the engine's members keeps working either way round.
    def __eq__(self, other):
        if isinstance(other, enum.Enum) and type(other).__name__ == "State":
            return self.name == other.name
        return NotImplemented

    def __hash__(self):
        return hash(self.name)


RUNNING_CONDITIONS = (State.BOOT, State.IDLE, State.ACTIVE, State.STEADY)
STOPPING_CONDITIONS = (State.SHUTTINGDOWN, State.SHUTDOWN, State.OFFLINE, State.ERROR)
INACTIVE_CONDITIONS = (State.OFFLINE, State.ERROR)


def as_state(value) -> State:
    """This package's ``State`` for ``value``: one of its members, or a member of
    another enum with the same name (the engine's ``State``, whose values are ints)."""
    if isinstance(value, State):
        return value
    if isinstance(value, enum.Enum) and value.name in State.__members__:
        return State[value.name]
    raise RuntimeError(f"{value!r} is not a State")


#: a state's number in the shared value (the members in their order)
_MEMBERS = tuple(State)


class ProcessingState:
    """A state that threads and forked processes can read, set and wait on.

    Held in shared memory with process-shared locks, as the engine's: its task
    manager forks a channel worker that sets the state the parent waits on.
    ``lock`` (re-entrant) lets a caller check and set without another thread or
    process setting in between, as the engine's reaper does.
    """

    def __init__(self, state=State.BOOT):
        self._lock = multiprocessing.RLock()
        self._changed = multiprocessing.Condition(self._lock)
        self._value = multiprocessing.RawValue("i", _MEMBERS.index(as_state(state)))

    @property
    def _state(self) -> State:
        return _MEMBERS[self._value.value]

    @property
    def lock(self):
        return self._lock

    def get(self) -> State:
        with self._lock:
            return self._state

    def set(self, state) -> None:
        state = as_state(state)
        with self._changed:
            self._value.value = _MEMBERS.index(state)
            self._changed.notify_all()

    def has_value(self, state) -> bool:
        if isinstance(state, (list, tuple, set, frozenset)):
            return any(self.has_value(s) for s in state)
        return self.get() is as_state(state)

    def wait_until(self, state, timeout: float | None = None) -> bool:
        """Wait until the state is ``state`` (or one of several); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self.has_value(state), timeout)

    def wait_while(self, state, timeout: float | None = None) -> bool:
        """Wait while the state is ``state`` (or one of several); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: not self.has_value(state), timeout)

    def set_unless_stopping(self, state) -> bool:
        """Set ``state`` unless a stop was asked for (a stopping state stands)."""
        with self._changed:
            if self.should_stop():
                return False
            self.set(state)
            return True

    def probably_running(self) -> bool:
        return self.has_value(RUNNING_CONDITIONS)

    def should_stop(self) -> bool:
        return self.has_value(STOPPING_CONDITIONS)

    def inactive(self) -> bool:
        return self.has_value(INACTIVE_CONDITIONS)

    def __eq__(self, other) -> bool:
        if isinstance(other, ProcessingState):
            return self.get() is other.get()
        if isinstance(other, enum.Enum):
            return other.name == self.get().name
        return NotImplemented

    __hash__ = None  # mutable: not a dict key

    def __repr__(self) -> str:
        return f"ProcessingState({self.get().name})"


__all__ = [
    "INACTIVE_CONDITIONS",
    "RUNNING_CONDITIONS",
    "STOPPING_CONDITIONS",
    "ProcessingState",
    "State",
]
