"""The training worker's read-ahead, without a Ray cluster: a stage's first batch is requested before the
models load (`Primed`), with the collate settings supplied once they have loaded (`DeferredCollate`)."""

import threading

import numpy as np
import pytest

from sdpo.worker import DeferredCollate, Primed, _never_collated

pytestmark = pytest.mark.timeout(60)


def gated(items, started: threading.Event, release: threading.Event):
    """A stream whose first item is produced only after `release`; `started` says it was asked for."""
    started.set()
    if not release.wait(timeout=30):
        raise TimeoutError("never released")
    yield from items


def test_the_first_item_is_requested_before_iteration_and_the_order_is_kept():
    started, release = threading.Event(), threading.Event()
    primed = Primed(gated([1, 2, 3], started, release))
    # nothing has iterated yet, but the stream is already being read (the models would load meanwhile)
    assert started.wait(timeout=10)
    release.set()
    assert list(primed) == [1, 2, 3]


def test_an_empty_stream_yields_nothing():
    assert list(Primed(iter([]))) == []


def test_an_error_in_the_read_ahead_is_raised_to_the_consumer():
    def broken():
        yield from ()
        raise OSError("s3://bucket/partitions: access denied")

    primed = Primed(broken())
    with pytest.raises(OSError, match="access denied"):
        list(primed)


def test_deferred_collate_waits_for_its_settings_then_applies_them():
    deferred = DeferredCollate()
    batch = {"x": np.arange(3)}
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("y", deferred(batch)))
    worker.start()
    worker.join(timeout=0.3)
    assert worker.is_alive()  # a prefetch thread holds its batch until the model is loaded
    deferred.resolve(lambda b: {"x": b["x"] * 2})
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert out["y"]["x"].tolist() == [0, 2, 4]
    assert deferred({"x": np.ones(2)})["x"].tolist() == [2.0, 2.0]  # later batches pass straight through


def test_a_stage_that_fails_before_training_releases_the_read_ahead():
    deferred = DeferredCollate()
    deferred.resolve(_never_collated)
    with pytest.raises(RuntimeError, match="stopped before training"):
        deferred({"x": np.ones(1)})
