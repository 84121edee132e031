"""Leases: a lock file that says "I am computing this; wait for me", shared by processes on any node.
No Ray, no torch.

Trials of a search (and runs that share a cache) often need the same output at the same moment: the
base model's held-out pass, stage 1's reference pass, a first stage two schedules share. Whoever takes
the lease computes it; the others wait for its completion marker instead of computing it again into
the same folder (which would mix their files). A holder keeps its lease fresh from a background thread
(`beat`, every `stale_after / 6` seconds); a lease nobody refreshed for `stale_after` seconds belongs
to a process that died, and is taken over — at once where its holder ran on this host and its pid is
gone (a run killed mid-pass and restarted does not wait for its own old lease).

- Local (and shared POSIX) filesystems: the lease is an exclusive create (`O_EXCL`, atomic), its age the
  file's mtime; a stale lease is first renamed aside (only one of several waiters' renames succeeds),
  so two processes never both take it over.
- Object stores (`s3://`): a conditional PUT (`If-None-Match: *`, honoured by AWS S3 and MinIO) is the
  exclusive create, and the age is the time written inside, rewritten by each beat. On a store that
  ignores the condition the lease is look-then-write, checked by reading it back: two processes taking
  it in the same instant may both compute (best effort).

A lease records its owner (host, pid, a random token); `release` removes it only while it is still
ours, so a holder that was presumed dead and came back cannot delete its successor's lease.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid

from sdpo import storage

STALE_AFTER = 180.0  # seconds without a beat before a lease counts as abandoned (beats: every 30 s)


class Lease:
    def __init__(self, path: str, *, stale_after: float = STALE_AFTER):
        self.path = storage.abspath(path)
        self.stale_after = stale_after
        self.token = uuid.uuid4().hex
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- taking and giving back
    def acquire(self) -> bool:
        """Take the lease if it is free or abandoned (never waits); on success a thread keeps it fresh
        until `release`."""
        took = self._take_local() if storage.is_local(self.path) else self._take_remote()
        if took:
            self._start_beating()
        return took

    def release(self) -> None:
        """Stop beating and remove the lease, if it is still ours."""
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._stop = self._thread = None
        if self.owner() == self.token:
            storage.remove(self.path, recursive=False)

    # ---------------------------------------------------------------- what is there
    def owner(self) -> str | None:
        """The token of whoever holds the lease now (None: nobody, or unreadable)."""
        content = self._read()
        return content.get("token") if content else None

    def held_by_other(self) -> bool:
        """Someone else holds it and is alive (beat within `stale_after`, and not a dead process of this
        host). A local lease is held from its exclusive create on, before its owner has written who it is."""
        content = self._read()
        return self._live(self.path, content) and (content or {}).get("token") != self.token

    def beat(self) -> None:
        if storage.is_local(self.path):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass
        elif self.owner() == self.token:
            storage.write_text_atomic(self.path, self._content())

    # ---------------------------------------------------------------- internals
    def _content(self) -> str:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": _started(os.getpid()), "beat": time.time()}) + "\n"

    def holder(self) -> str:
        """Who holds the lease, for messages: "host, pid N" (or "unknown")."""
        content = self._read() or {}
        return f"{content['host']}, pid {content['pid']}" if "host" in content and "pid" in content else "unknown"

    def _read(self) -> dict | None:
        return _read_json(self.path)

    def _live(self, path: str, content: dict | None) -> bool:
        """Whether the lease at `path` (its `content`) was refreshed within `stale_after` by a holder that
        is not a dead process of this host. Local: the file's mtime; object stores: the beat inside."""
        if storage.is_local(path):
            try:
                age = time.time() - os.path.getmtime(path)
            except FileNotFoundError:
                return False
        else:
            age = time.time() - float(content.get("beat", 0.0)) if content else math.inf
        return age < self.stale_after and not _dead(content)

    def _take_local(self) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._live(self.path, self._read()):
                    return False
                aside = f"{self.path}.stale.{self.token}"
                try:
                    os.rename(self.path, aside)  # one waiter wins this; the others find no file to move
                except FileNotFoundError:
                    continue  # released, or moved by another waiter: the create decides
                if self._live(aside, _read_json(aside)):
                    # another waiter took it over between our look and our move: give its lease back
                    try:
                        os.link(aside, self.path)
                    except FileExistsError:
                        pass
                    os.unlink(aside)
                    return False
                os.unlink(aside)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self._content())
            return True
        return False

    def _take_remote(self) -> bool:
        fs, path = storage.fs_and_path(self.path)
        content = self._content().encode()

        def create() -> bool:  # an exclusive PUT (If-None-Match: *) on stores that honour it
            try:
                fs.pipe_file(path, content, mode="create")
            except FileExistsError:
                return False
            return True

        if not storage.retry(create, what=f"PUT {self.path}"):
            if self.held_by_other():
                return False
            storage.write_text_atomic(self.path, self._content())  # abandoned (or our own retried PUT)
        return self.owner() == self.token  # a store that ignored the condition: the last writer holds it

    def _start_beating(self) -> None:
        stop = threading.Event()
        every = max(self.stale_after / 6, 0.05)

        def loop() -> None:
            while not stop.wait(every):
                try:
                    self.beat()
                except Exception:  # a missed beat is retried at the next; only stale_after of them matter
                    pass

        self._stop, self._thread = stop, threading.Thread(target=loop, name=f"lease {self.path}", daemon=True)
        self._thread.start()


def _read_json(path: str) -> dict | None:
    try:
        content = json.loads(storage.read_text(path))
    except (FileNotFoundError, ValueError, OSError, storage.StorageError):
        return None
    return content if isinstance(content, dict) else None


def _started(pid: int) -> str | None:
    """A process's start time (Linux: /proc/PID/stat's starttime, in clock ticks since boot): with the
    pid it names one process, even after the pid is reused. "zombie" for an exited, unreaped one; None
    where /proc has no such process (or there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return "zombie" if fields[0] == "Z" else fields[19]


def _dead(content: dict | None) -> bool:
    """Whether a lease's holder is a process of this host that no longer exists: its pid is gone, a
    zombie, or now another process (a different start time: a restarted container reuses low pids)."""
    if not content or content.get("host") != socket.gethostname():
        return False
    pid = content.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    started = _started(pid)
    if started == "zombie":
        return True
    if started is not None:
        return content.get("started") is not None and content["started"] != started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, someone else's
        return False
    return False


def wait_while_held(lease: Lease, done, *, poll: float = 1.0, timeout: float | None = None) -> bool:
    """Wait until `done()` or until no one else holds `lease` (its holder finished, failed or died).
    Returns done(). `timeout`: raise TimeoutError after that many seconds of waiting."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if done():
            return True
        if not lease.held_by_other():
            return done()
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f}s for {lease.path}, held by another process")
        time.sleep(poll)
