"""The UNet's turns: first come first served, re-entrant, a bounded waiting room for visitors' requests."""
import threading
import time

import pytest

from abu_explorer.app.turns import Busy, Turns, waiting_room_from_env


def _wait_for(cond, timeout=5.0):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.005)


def test_turns_are_served_in_arrival_order_and_nest():
    turns, order = Turns(max_waiting=10), []
    turns.acquire()
    with turns:  # the holder may take it again (attribution generates its query inside its turn)
        pass
    threads = []
    for i in range(5):
        t = threading.Thread(target=lambda i=i: (turns.acquire(), order.append(i), turns.release()))
        t.start()
        _wait_for(lambda: turns.waiting == i + 1)  # each joins the line before the next arrives
        threads.append(t)
    turns.release()
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2, 3, 4]


def test_a_full_waiting_room_refuses_requests_in_one_line_but_admitted_work_waits():
    turns = Turns(max_waiting=2)
    turns.acquire()
    done = []
    waiters = [threading.Thread(target=lambda: (turns.request().__enter__(), done.append(1), turns.release()))
               for _ in range(2)]
    for t in waiters:
        t.start()
    _wait_for(lambda: turns.waiting == 2)
    refusal = []

    def visitor():
        try:
            with turns.request():
                pass
        except Busy as e:
            refusal.append(str(e))
    t = threading.Thread(target=visitor)
    t.start()
    t.join(5)
    assert len(refusal) == 1, "a third request was let into a waiting room of two"
    msg = refusal[0]
    assert "\n" not in msg and "busy" in msg and "2 requests are waiting" in msg and "try again" in msg
    assert turns.refused == 1
    retrain = threading.Thread(target=lambda: (turns.acquire(), done.append(2), turns.release()))
    retrain.start()  # a retrain's measurement is never refused, it joins the line
    _wait_for(lambda: turns.waiting == 3)
    turns.release()
    for t in [*waiters, retrain]:
        t.join(5)
    assert done == [1, 1, 2] and turns.waiting == 0


def test_release_by_another_thread_is_an_error_and_the_room_is_read_from_the_environment(monkeypatch):
    turns = Turns()
    turns.acquire()
    errors = []

    def other():
        try:
            turns.release()
        except RuntimeError as e:
            errors.append(e)
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errors
    turns.release()
    monkeypatch.setenv("ABU_MAX_WAITING", "3")
    assert waiting_room_from_env() == 3
    monkeypatch.setenv("ABU_MAX_WAITING", "0")
    with pytest.raises(ValueError, match="ABU_MAX_WAITING"):
        waiting_room_from_env()
