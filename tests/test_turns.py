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


def test_admission_refuses_in_the_event_loop_without_a_thread_and_admitted_requests_are_never_refused():
    """The app's UNet handlers (``views.common.admitted``): a full room refuses before a worker thread is
    taken; an admitted request's turns in the worker thread (a copied context) are not refused, and each
    admitted request counts as waiting until it joins the line."""
    import anyio
    import gradio as gr

    from abu_explorer.app.views.common import admitted

    class App:
        lock = Turns(max_waiting=2)
    turns, threads_started, served = App.lock, [], []

    def work(i):
        threads_started.append(i)
        with turns.request():  # would refuse a non-admitted request: the room is full of admitted ones
            served.append(i)
        return i
    handler = admitted(App, work)

    async def main():
        turns.acquire()  # a retrain's measurement holds the UNet (this thread runs the event loop)
        results, refusals = {}, []

        async def visit(i):
            try:
                results[i] = await handler(i)
            except gr.Error as e:
                refusals.append(str(e))
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(visit, i)
            try:
                with anyio.fail_after(5):
                    while len(refusals) < 3 or len(threads_started) < 2:
                        await anyio.sleep(0.01)
                await anyio.sleep(0.2)  # time for a wrongly admitted third to take a thread
                assert len(threads_started) == 2, "a refused request took a worker thread"
                assert turns.waiting == 2
            finally:  # the measurement ends (also after a failed check): the admitted requests are served
                turns.release()
        return results, refusals
    results, refusals = anyio.run(main)
    assert sorted(results) == sorted(served) and len(served) == 2
    assert len(refusals) == 3 and all("busy" in r and "\n" not in r for r in refusals)
    assert turns.waiting == 0 and turns.refused == 3


def test_an_admitted_request_hears_how_many_turns_are_ahead_of_it():
    turns, heard = Turns(max_waiting=4), []
    turns.acquire()
    first = threading.Thread(target=lambda: (turns.acquire(), time.sleep(0.05), turns.release()))
    first.start()
    _wait_for(lambda: turns.waiting == 1)

    def visitor():
        with turns.admit(heard.append), turns.request():
            pass
    t = threading.Thread(target=visitor)
    t.start()
    _wait_for(lambda: turns.waiting == 2)
    turns.release()
    for th in (first, t):
        th.join(5)
    assert heard == [2, 1] and turns.waiting == 0  # the holder and the first in line, then the other's turn
