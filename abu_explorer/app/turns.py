"""The shared UNet, taken in turns: first come, first served, with a bounded waiting room.

Generation, the gradient methods and a retrain's measurements all use the one UNet (AbU and IF move its
weights while they score), so they take turns. A visitor's request that finds the waiting room full is
refused at once with one line (how many wait, and about how long) instead of joining a queue that grows
without bound; work already admitted (a retrain's measurements) always waits for its turn.
"""
from __future__ import annotations

import collections
import os
import threading
import time

from abu_explorer.app.inputs import UIError


class Busy(UIError):
    """The waiting room is full: try again later."""


def waiting_room_from_env() -> int:
    """``ABU_MAX_WAITING``: requests that may wait for the UNet at once (default 8)."""
    raw = os.environ.get("ABU_MAX_WAITING", "8")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"ABU_MAX_WAITING must be a whole number >= 1, got {raw!r}")
    return int(raw)


class Turns:
    """A re-entrant FIFO lock. ``with turns:`` waits for the turn; ``with turns.request():`` is refused with
    ``Busy`` when ``max_waiting`` requests already wait."""

    def __init__(self, max_waiting: int = 8):
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._line: collections.deque = collections.deque()
        self._owner: int | None = None
        self._depth = 0
        self._held_since = 0.0
        self._typical = 5.0  # seconds a turn takes, a running average (for the refusal's estimate)
        self.refused = 0

    def acquire(self, refuse_when_full: bool = False) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            if refuse_when_full and self._owner is not None and len(self._line) >= self.max_waiting:
                self.refused += 1
                wait = (len(self._line) + 1) * self._typical
                raise Busy(f"the server is busy: {len(self._line)} requests are waiting for the model "
                           f"(at most {self.max_waiting}); try again in about {wait:.0f} s")
            ticket = object()
            self._line.append(ticket)
            try:
                while self._owner is not None or self._line[0] is not ticket:
                    self._cond.wait()
            except BaseException:
                self._line.remove(ticket)
                self._cond.notify_all()
                raise
            self._line.popleft()
            self._owner, self._depth, self._held_since = me, 1, time.perf_counter()

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a turn this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                held = time.perf_counter() - self._held_since
                self._typical = 0.8 * self._typical + 0.2 * held
                self._owner = None
                self._cond.notify_all()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def request(self) -> "_Request":
        """A visitor's turn: refused at once (``Busy``) when the waiting room is full."""
        return _Request(self)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._line)


class _Request:
    def __init__(self, turns: Turns):
        self.turns = turns

    def __enter__(self):
        self.turns.acquire(refuse_when_full=True)
        return self.turns

    def __exit__(self, *exc):
        self.turns.release()
        return False
