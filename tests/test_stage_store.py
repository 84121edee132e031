"""The stage store shared by a search's trials: content-addressed, whole-or-nothing, trained once."""

import json
import multiprocessing as mp
import os
import time

from sdpo.stage_store import StageStore, stage_key

INPUTS = {"base": "b", "reference": "b", "init": "b", "partition": "p1", "settings": {"stage.index": 1}}


def _model(tmp_path, name="stage"):
    """A stage folder: model/ and its step log."""
    d = tmp_path / name
    (d / "model").mkdir(parents=True)
    (d / "model" / "config.json").write_text("{}")
    (d / "model" / "model.safetensors").write_bytes(b"weights")
    (d / "trainer_log.jsonl").write_text('{"step": 1}\n')
    return str(d)


def test_key_changes_with_every_input():
    keys = {stage_key(INPUTS)}
    for field, value in [("base", "x"), ("reference", "x"), ("init", "x"), ("partition", "x"),
                         ("settings", {"stage.index": 2})]:
        keys.add(stage_key(INPUTS | {field: value}))
    assert len(keys) == 6
    assert stage_key(dict(reversed(list(INPUTS.items())))) == stage_key(INPUTS)  # order-free


def test_claim_publish_get(tmp_path):
    store = StageStore(str(tmp_path / "store"))
    assert store.claim(INPUTS) is None  # a miss: we hold the lock now
    assert store.get(INPUTS) is None  # nothing visible before publish
    entry = store.publish(INPUTS, stage_dir=_model(tmp_path), record={"index": 1, "metrics": {"steps": 3}})
    assert (tmp_path / "store" / entry.key / "stage" / "model" / "model.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "store" / entry.key / "stage" / "trainer_log.jsonl").exists()
    again = store.claim(INPUTS)
    assert again is not None and again.record["metrics"]["steps"] == 3 and again.model == entry.model
    assert not (tmp_path / "store" / f"{entry.key}.lock").exists()


def test_half_written_entry_is_a_miss(tmp_path):
    store = StageStore(str(tmp_path / "store"))
    key = stage_key(INPUTS)
    (tmp_path / "store" / key / "model").mkdir(parents=True)  # a crash before the marker
    (tmp_path / "store" / key / "record.json").write_text("{}")
    assert store.get(INPUTS) is None


def test_stale_lock_is_taken_over(tmp_path):
    store = StageStore(str(tmp_path / "store"), stale_after=0.5)
    lock = tmp_path / "store" / f"{stage_key(INPUTS)}.lock"
    lock.write_text("12345\n")  # a trial that died holding it
    old = time.time() - 10
    os.utime(lock, (old, old))
    assert store.claim(INPUTS, timeout=5) is None  # taken over: our turn to train


def _trial(root, model, counter, barrier):
    """One trial needing the stage: train it (count) unless the store has it."""
    store = StageStore(root, poll=0.05)
    barrier.wait()
    entry = store.claim(INPUTS, timeout=60)
    if entry is None:
        with open(counter, "a") as f:
            f.write("trained\n")
        time.sleep(0.5)  # training takes a while; the others must wait, not train too
        store.publish(INPUTS, stage_dir=model, record={"by": os.getpid()})


def test_concurrent_trials_train_a_shared_stage_once(tmp_path):
    root, counter = str(tmp_path / "store"), str(tmp_path / "count")
    model = _model(tmp_path)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_trial, args=(root, model, counter, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert open(counter).read().count("trained") == 1
    record = json.loads((tmp_path / "store" / stage_key(INPUTS) / "record.json").read_text())
    assert "by" in record


def test_a_stage_in_training_keeps_its_lease_past_stale_after(tmp_path):
    """Training outlasts `stale_after` (a real stage takes hours): the holder's lease beats, so a second
    trial keeps waiting instead of taking the stage over and training it again."""
    import pytest

    trainer, waiter = StageStore(str(tmp_path / "store"), stale_after=0.6), StageStore(str(tmp_path / "store"),
                                                                                       stale_after=0.6, poll=0.05)
    assert trainer.claim(INPUTS) is None
    time.sleep(1.5)
    with pytest.raises(TimeoutError, match="locked by another trial"):
        waiter.claim(INPUTS, timeout=0.5)
    trainer.publish(INPUTS, stage_dir=_model(tmp_path), record={"index": 1})
    assert waiter.claim(INPUTS, timeout=5) is not None
