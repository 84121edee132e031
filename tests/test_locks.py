"""Leases (`sdpo.locks`): one holder at a time across processes, kept fresh while held, taken over once
abandoned, released only by their owner; on local disk and on a real S3 server (moto on loopback)."""

import multiprocessing as mp
import os
import time

import pytest

from sdpo import storage
from sdpo.locks import Lease, wait_while_held


def test_one_holder_at_a_time(tmp_path):
    path = str(tmp_path / "x.lock")
    a, b = Lease(path), Lease(path)
    assert a.acquire()
    assert not b.acquire() and b.held_by_other() and not a.held_by_other()
    a.release()
    assert not os.path.exists(path) and not b.held_by_other()
    assert b.acquire()
    b.release()


def test_a_held_lease_stays_fresh_past_stale_after(tmp_path):
    path = str(tmp_path / "x.lock")
    holder = Lease(path, stale_after=0.6)
    assert holder.acquire()
    time.sleep(1.5)  # 2.5 stale periods: only the holder's beats keep it
    assert not Lease(path, stale_after=0.6).acquire()
    holder.release()


def test_an_abandoned_lease_is_taken_over(tmp_path):
    path = tmp_path / "x.lock"
    path.write_text('{"token": "dead"}\n')  # its holder died: nobody beats it any more
    old = time.time() - 10
    os.utime(path, (old, old))
    waiter = Lease(str(path), stale_after=5)
    assert not waiter.held_by_other()
    assert waiter.acquire() and waiter.owner() == waiter.token
    waiter.release()
    assert not path.exists()


def test_a_fresh_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    """A run killed mid-pass (SIGKILL: no release) and restarted at once must not wait out stale_after."""
    import json
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / "x.lock"
    path.write_text(json.dumps({"token": "killed", "host": socket.gethostname(), "pid": int(gone.stdout)}))
    waiter = Lease(str(path), stale_after=3600)
    assert not waiter.held_by_other() and waiter.acquire()
    waiter.release()
    # the same lease held by a live process (this test's parent) is respected
    path.write_text(json.dumps({"token": "alive", "host": socket.gethostname(), "pid": os.getppid()}))
    assert waiter.held_by_other() and not waiter.acquire()
    # a pid now used by another process (a restarted container reuses low pids): its start time differs
    path.write_text(json.dumps({"token": "old", "host": socket.gethostname(), "pid": os.getpid(), "started": "1"}))
    assert not waiter.held_by_other() and waiter.acquire()
    waiter.release()
    # and one from another host, whose pids mean nothing here, waits for stale_after
    path.write_text(json.dumps({"token": "remote", "host": "another-node", "pid": int(gone.stdout)}))
    assert waiter.held_by_other() and not waiter.acquire()


def test_a_waiter_that_looked_before_a_takeover_gives_the_new_lease_back(tmp_path, monkeypatch):
    """Waiter B saw the old lease stale; before B moved it aside, A took it over. B must not break A's."""
    path = str(tmp_path / "x.lock")
    a, b = Lease(path, stale_after=60), Lease(path, stale_after=60)
    assert a.acquire()
    real, calls = os.path.getmtime, []

    def seen_stale_once(p):  # B's look happened before A's takeover: it saw an old time
        calls.append(p)
        return real(p) - 1000 if len(calls) == 1 else real(p)

    monkeypatch.setattr(os.path, "getmtime", seen_stale_once)
    assert not b.acquire()
    monkeypatch.undo()
    assert a.owner() == a.token and b.held_by_other()
    a.release()


def test_release_leaves_a_successors_lease(tmp_path):
    """A holder presumed dead (its lease taken over) must not delete the new holder's lease on release."""
    path = str(tmp_path / "x.lock")
    slow, successor = Lease(path), Lease(path)
    assert slow.acquire()
    os.unlink(path)  # as if taken over while `slow` stalled
    assert successor.acquire()
    slow.release()
    assert successor.owner() == successor.token
    successor.release()


def test_wait_while_held_returns_when_done_or_abandoned(tmp_path):
    path, marker = str(tmp_path / "x.lock"), tmp_path / "done"
    holder = Lease(path)
    assert holder.acquire()
    waiter = Lease(path)
    with pytest.raises(TimeoutError, match="x.lock"):
        wait_while_held(waiter, marker.exists, poll=0.05, timeout=0.3)
    marker.write_text("")
    assert wait_while_held(waiter, marker.exists, poll=0.05)
    marker.unlink()
    holder.release()  # released without the result (its work failed): the waiter stops waiting
    assert not wait_while_held(waiter, marker.exists, poll=0.05)


def _race(path, counter, barrier):
    lease = Lease(path)
    barrier.wait()
    if lease.acquire():
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        lease.release()


def _winners(path, tmp_path, n=4) -> int:
    """How many of `n` processes released at once took the lease."""
    counter = str(tmp_path / "winners")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=_race, args=(path, counter, barrier)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    return len(open(counter).read().split())


@pytest.mark.timeout(60)
def test_processes_racing_for_a_lease_let_one_win(tmp_path):
    path = str(tmp_path / "x.lock")
    assert _winners(path, tmp_path) == 1
    assert not os.path.exists(path)


@pytest.mark.timeout(60)
def test_stale_takeover_by_racing_processes_lets_one_win(tmp_path):
    """Several waiters finding the same abandoned lease: the rename-aside lets exactly one take it."""
    path = tmp_path / "x.lock"
    path.write_text('{"token": "dead"}\n')
    old = time.time() - 1000
    os.utime(path, (old, old))
    assert _winners(str(path), tmp_path) == 1


@pytest.mark.timeout(120)
def test_leases_on_s3(s3_server):
    root = s3_server.make_bucket("sdpo-locks-test")
    path = storage.join(root, "cache", "scores", "k.lock")
    a, b = Lease(path, stale_after=1.0), Lease(path, stale_after=1.0)
    assert a.acquire()
    assert not b.acquire() and b.held_by_other()
    time.sleep(1.5)  # a's thread rewrites its beat: still held
    assert b.held_by_other() and not b.acquire()
    a.release()
    assert not storage.exists(path) and b.acquire()
    b._stop.set()  # b "dies": nobody beats any more
    time.sleep(1.2)
    c = Lease(path, stale_after=1.0)
    assert not c.held_by_other() and c.acquire() and c.owner() == c.token
    b.release()  # the presumed dead must not remove c's lease
    assert c.owner() == c.token
    c.release()
    assert not storage.exists(path)


# --------------------------------------------------------------------------------------------------
# score_targets under leases (the pass itself replaced by one that writes the marker: the real pass
# under concurrent trials is tests/test_tune_concurrent.py)
# --------------------------------------------------------------------------------------------------
def _targets(tmp_path, n):
    from sdpo.passes import Target

    return [Target(f"src{i}", str(tmp_path / "scores" / f"k{i}"), 10, {"key": f"k{i}", "num_rows": 10}, what=f"t{i}")
            for i in range(n)] + [Target("own", str(tmp_path / "run" / "own"), 10, None, what="own")]


@pytest.fixture
def passes(monkeypatch):
    """score_targets with a pass that records what it was given and marks each target complete."""
    from sdpo import caching, passes

    calls = []

    def fake(model, targets, settings, **kw):
        calls.append([t.what for t in targets])
        for t in targets:
            os.makedirs(t.path, exist_ok=True)
            if t.marker is not None:
                caching.write_marker(t.path, t.marker)
        return 1.0

    monkeypatch.setattr(passes, "_score_now", fake)
    return passes, calls


def test_entries_held_by_another_process_are_waited_for_not_rescored(tmp_path, passes):
    import threading

    from sdpo import caching

    mod, calls = passes
    t0, t1, own = _targets(tmp_path, 2)
    other = Lease(t1.path + ".lock")
    assert other.acquire()  # another trial is scoring k1

    def finish():
        time.sleep(0.5)
        os.makedirs(t1.path, exist_ok=True)
        caching.write_marker(t1.path, t1.marker)
        other.release()

    threading.Thread(target=finish).start()
    run = mod.score_targets("m", [t0, t1, own], None, work_dir="", poll=0.05)
    assert calls == [["t0", "own"]]  # k1 not scored here
    assert [t.what for t in run.scored] == ["t0", "own"] and [t.what for t in run.waited] == ["t1"]
    assert not os.path.exists(t0.path + ".lock")  # our lease given back


def test_an_entry_whose_holder_fails_is_scored_here(tmp_path, passes):
    import threading

    mod, calls = passes
    (t0, own) = _targets(tmp_path, 1)
    other = Lease(t0.path + ".lock")
    assert other.acquire()
    threading.Timer(0.3, other.release).start()  # its pass failed: released, nothing written
    run = mod.score_targets("m", [t0], None, work_dir="", poll=0.05)
    assert calls == [["t0"]] and [t.what for t in run.scored] == ["t0"] and not run.waited


def test_a_complete_entry_is_not_rescored_and_a_failed_pass_gives_its_leases_back(tmp_path, passes, monkeypatch):
    from sdpo import caching

    mod, calls = passes
    t0, t1, own = _targets(tmp_path, 2)
    os.makedirs(t0.path)
    caching.write_marker(t0.path, t0.marker)  # completed by another process after the caller looked
    run = mod.score_targets("m", [t0], None, work_dir="")
    assert calls == [] and [t.what for t in run.waited] == ["t0"]

    def broken(*a, **k):
        raise RuntimeError("pass failed")

    monkeypatch.setattr(mod, "_score_now", broken)
    with pytest.raises(RuntimeError, match="pass failed"):
        mod.score_targets("m", [t1], None, work_dir="")
    assert not os.path.exists(t1.path + ".lock")


@pytest.mark.timeout(120)
def test_threads_racing_for_a_lease_on_s3_let_one_win(s3_server):
    """Of 6 threads released at once, one holds the lease; the server refuses a second create of a held
    lease outright (the conditional PUT), before any look or read-back."""
    import threading

    root = s3_server.make_bucket("sdpo-locks-race")
    path = storage.join(root, "k.lock")
    barrier, won = threading.Barrier(6), []

    def race():
        lease = Lease(path)
        barrier.wait()
        if lease.acquire():
            won.append(lease)

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1
    fs, key = storage.fs_and_path(path)
    with pytest.raises(FileExistsError):
        fs.pipe_file(key, b"{}", mode="create")
    won[0].release()
