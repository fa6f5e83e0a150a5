"""The shared UNet, taken in turns: first come, first served, with a bounded waiting room.

Generation, the gradient methods and a retrain's measurements all use the one UNet (AbU and IF move its
weights while they score), so they take turns. A visitor's request that finds the waiting room full is
refused at once with one line (how many wait, and about how long) instead of joining a queue that grows
without bound; work already admitted (a retrain's measurements) always waits for its turn.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import os
import threading
import time

from abu_explorer.app.inputs import UIError


class Busy(UIError):
    """The waiting room is full: try again later."""


class _Pass:
    """An admitted request (``Turns.admit``): counted as waiting until it first joins the line or ends.
    ``on_wait(ahead)`` hears how many turns are ahead of it while it waits (the page shows it)."""

    def __init__(self, on_wait=None):
        self.counted = True
        self.on_wait = on_wait


_PASS: contextvars.ContextVar = contextvars.ContextVar("abu_turns_pass", default=None)


def waiting_room_from_env() -> int:
    """``ABU_MAX_WAITING``: requests that may wait for the UNet at once (default 16: one Attribute click with
    every method checked is 7 requests)."""
    raw = os.environ.get("ABU_MAX_WAITING", "16")
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"ABU_MAX_WAITING must be a whole number >= 1, got {raw!r}")
    return int(raw)


class Turns:
    """A re-entrant FIFO lock. ``with turns:`` waits for the turn; ``with turns.request():`` is refused with
    ``Busy`` when ``max_waiting`` requests already wait."""

    def __init__(self, max_waiting: int = 16):
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._line: collections.deque = collections.deque()
        self._owner: int | None = None
        self._depth = 0
        self._held_since = 0.0
        self._typical = 5.0  # seconds a turn takes, a running average (for the refusal's estimate)
        self._outside = 0  # admitted requests that have not joined the line yet
        self.refused = 0

    def _refuse(self) -> Busy:
        self.refused += 1
        waiting = len(self._line) + self._outside
        return Busy(f"the server is busy: {waiting} requests are waiting for the model "
                    f"(at most {self.max_waiting}); try again in about {(waiting + 1) * self._typical:.0f} s")

    @contextlib.contextmanager
    def admit(self, on_wait=None):
        """Admission before any work (and before a worker thread is taken): refused at once with ``Busy`` when
        the waiting room is full, else the request holds a pass until it ends, and its turns inside (in this
        context, or a worker thread that copies it) are never refused."""
        with self._cond:
            if len(self._line) + self._outside >= self.max_waiting:
                raise self._refuse()
            ticket = _Pass(on_wait)
            self._outside += 1
        token = _PASS.set(ticket)
        try:
            yield self
        finally:
            _PASS.reset(token)
            with self._cond:
                self._uncount(ticket)

    def _uncount(self, ticket: _Pass | None) -> None:
        if ticket is not None and ticket.counted:
            ticket.counted = False
            self._outside -= 1

    def acquire(self, refuse_when_full: bool = False) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            admitted = _PASS.get()
            if refuse_when_full and admitted is None and self._owner is not None \
                    and len(self._line) + self._outside >= self.max_waiting:
                raise self._refuse()
            self._uncount(admitted)  # from now on it is counted in the line
            ticket = object()
            self._line.append(ticket)
            heard = None
            try:
                while self._owner is not None or self._line[0] is not ticket:
                    ahead = self._line.index(ticket) + (self._owner is not None)
                    if admitted is not None and admitted.on_wait is not None and ahead != heard:
                        admitted.on_wait(ahead)  # quick (a progress message); called with the lock held
                        heard = ahead
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
        """Requests waiting for a turn: in the line, or admitted and on their way to it."""
        with self._cond:
            return len(self._line) + self._outside


class _Request:
    def __init__(self, turns: Turns):
        self.turns = turns

    def __enter__(self):
        self.turns.acquire(refuse_when_full=True)
        return self.turns

    def __exit__(self, *exc):
        self.turns.release()
        return False
