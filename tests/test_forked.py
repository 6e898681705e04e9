"""The evaluation's second process (trainer/forked.py): results through files, failures reported, never lost."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

from chronorec.trainer.forked import EncoderNeeded, Forked, beside, can_fork, refuse_to_encode, workers_for

pytestmark = pytest.mark.skipif(not can_fork(), reason="forks where fork is the platform's way")


def test_the_child_sees_this_processs_data_and_hands_back_files():
    data = np.arange(1000.0)  # built before the fork: the child reads it without a copy being sent

    def work(folder):
        np.save(folder / "out.npy", data * 2)
        (folder / "pid").write_text(str(os.getpid()))

    with Forked(work, name="test") as child:
        here = data.sum()  # this process goes on meanwhile
        assert child.wait() is None
        np.testing.assert_array_equal(np.load(child.folder / "out.npy"), data * 2)
        assert int((child.folder / "pid").read_text()) != os.getpid()
        folder = child.folder
    assert here == data.sum() and not folder.exists()  # the files go with the block


def test_a_failing_child_says_why():
    def work(_folder):
        refuse_to_encode(["a text"])

    with Forked(work, name="test") as child:
        failure = child.wait()
    assert failure is not None and failure.startswith("EncoderNeeded") and "1 text(s)" in failure
    with pytest.raises(EncoderNeeded):
        refuse_to_encode([])


def test_a_child_that_dies_is_a_failure_not_a_hang():
    def work(_folder):
        os._exit(3)

    with Forked(work, name="test") as child:
        assert "code 3" in child.wait()


def test_a_child_that_cannot_start_leaves_the_work_here(monkeypatch):
    def refuse(self):
        raise OSError("no more processes")

    monkeypatch.setattr(multiprocessing.get_context("fork").Process, "start", refuse)
    with Forked(lambda _folder: None, name="test") as child:
        assert "did not start" in child.wait()


def test_workers():
    assert workers_for(1) == 1 and workers_for(3) == 3
    assert workers_for(None) == min(2, os.cpu_count() or 1)


def test_beside_computes_one_part_in_a_child_and_the_failed_part_here(caplog):
    data = np.arange(10.0)
    calls = []

    def here():
        calls.append(os.getpid())
        return data[:5].sum()

    def there():
        return {"pid": os.getpid(), "sum": data[5:].sum()}

    mine, theirs = beside(here, there, name="test")
    assert mine == data[:5].sum() and theirs["sum"] == data[5:].sum()
    assert theirs["pid"] != os.getpid() and calls == [os.getpid()]

    state = {"encoder": "here"}

    def needs_the_encoder():
        if state["encoder"] != "here":
            refuse_to_encode(["a text"])
        return "encoded"

    with caplog.at_level("WARNING"):
        mine, theirs = beside(lambda: "first", needs_the_encoder, name="test",
                              in_child=lambda: state.update(encoder="refuses"))
    assert (mine, theirs) == ("first", "encoded") and state["encoder"] == "here"
    assert "test: the second process failed (EncoderNeeded" in caplog.text
