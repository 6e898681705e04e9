"""Recommend calls take turns through the compute gate, and a call waiting on the encoder lets the others through."""

from __future__ import annotations

import threading
import time

import numpy as np

from chronorec.server.core.compute_gate import RECOMMEND_GATE, ComputeGate
from test_ranking import NOW, TopicEncoder, make_ranker, query


def test_one_thread_at_a_time_reentrant_and_stepping_out_lets_another_in():
    gate = ComputeGate()
    inside, overlap, order = [0], [], []

    def work(name: str) -> None:
        with gate.inside():
            with gate.inside():  # re-entrant on the same thread
                inside[0] += 1
                overlap.append(inside[0])
                time.sleep(0.01)
                inside[0] -= 1
        order.append(name)

    threads = [threading.Thread(target=work, args=(str(n),)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(overlap) == 1 and len(order) == 6 and not gate.held

    stepped_out, came_back = threading.Event(), threading.Event()

    def waiter() -> None:
        with gate.inside():
            with gate.stepped_out():
                stepped_out.set()
                assert came_back.wait(5)
            assert gate.held

    thread = threading.Thread(target=waiter)
    thread.start()
    assert stepped_out.wait(5)
    with gate.inside():  # free while the waiter is out
        came_back.set()
    thread.join(5)
    assert not thread.is_alive()
    with gate.stepped_out():  # outside the gate, stepping out is a no-op
        assert not gate.held


class SlowEncoder(TopicEncoder):
    """Blocks on `release` when it sees `blocked_user`'s history (a cold user behind a busy encoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()
        self.block = False

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.block:
            self.entered.set()
            assert self.release.wait(10)
        return super().__call__(texts)


def test_a_call_waiting_on_the_encoder_does_not_hold_up_cached_calls():
    encoder = SlowEncoder()
    ranker = make_ranker(encoder=encoder)
    expected = ranker.recommend(query("alice"))  # alice's history text is now cached
    encoder.block = True
    cold = {}
    thread = threading.Thread(target=lambda: cold.update(result=ranker.recommend(query("bg3", at=NOW))))
    thread.start()
    try:
        assert encoder.entered.wait(5)
        # The cold call is inside the encoder; a cached call runs to the end meanwhile.
        started = time.perf_counter()
        again = ranker.recommend(query("alice"))
        assert time.perf_counter() - started < 5
        assert [r.item_id for r in again.items] == [r.item_id for r in expected.items] and again.used_cache
        assert "result" not in cold
    finally:
        encoder.release.set()
        thread.join(10)
    assert cold["result"].items and not cold["result"].used_cache
    assert not RECOMMEND_GATE.held
