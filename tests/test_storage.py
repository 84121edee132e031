"""The storage layer against a real S3 server (moto on loopback, `s3_server`), local disk, and Ray.

No mock of s3fs: transient failures come from `FlakyProxy`, a proxy that really answers 503 SlowDown
or resets the connection. Ray tests (Ray Data parquet, Ray Train checkpoints on s3://) run last in
one local Ray session started after the server fixture set AWS_ENDPOINT_URL, so workers inherit it.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import time

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from sdpo import storage
from sdpo.storage import StorageError, StorageNotFoundError

from .s3server import FlakyProxy, clear_fs_caches


def _client_error(code: str, status: int, op: str = "PutObject", **extra) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code, **extra},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


def _translated(code: str, status: int, exc: OSError) -> OSError:
    """What s3fs raises: a Python OSError `from` botocore's ClientError."""
    exc.__cause__ = _client_error(code, status)
    return exc


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("exc", [
    _client_error("SlowDown", 503),
    _client_error("503", 503, "HeadObject"),  # HEAD errors carry no body, only the status
    _client_error("InternalError", 500),
    _client_error("RequestTimeout", 400),
    _translated("SlowDown", 503, OSError(errno.EBUSY, "Please reduce your request rate.")),
    _translated("RequestTimeout", 400, TimeoutError("Your socket connection to the server was not read")),
    EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
    ConnectionClosedError(endpoint_url="http://127.0.0.1:9"),
    ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    TimeoutError("timed out"),
    OSError(errno.EPIPE, "Broken pipe"),
    OSError(errno.ETIMEDOUT, "Connection timed out"),
    OSError("When uploading 'b/k': AWS Error SLOW_DOWN during PutObject operation: Please reduce"),  # pyarrow
], ids=lambda e: type(e).__name__)
def test_classify_transient(exc):
    assert storage.classify(exc) == "transient"


@pytest.mark.parametrize("exc", [
    _client_error("NoSuchBucket", 404, BucketName="x"),
    _client_error("AccessDenied", 403),
    _client_error("InvalidAccessKeyId", 403),
    _client_error("404", 404, "HeadObject"),
    _translated("NoSuchBucket", 404, FileNotFoundError("The specified bucket does not exist")),
    _translated("AccessDenied", 403, PermissionError("Access Denied")),
    FileNotFoundError("bucket/missing-key"),
    PermissionError(errno.EACCES, "Permission denied"),
    NoCredentialsError(),
    StorageError("already retried and diagnosed"),
    OSError(errno.EIO, "something else"),
    ValueError("not an I/O problem"),
], ids=lambda e: type(e).__name__)
def test_classify_permanent(exc):
    assert storage.classify(exc) == "permanent"


def test_retry_recovers_from_transient_errors_and_logs_each_retry(caplog):
    calls = []

    def flaky(x, *, y):
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return x + y

    with caplog.at_level(logging.WARNING, logger="sdpo.storage"):
        assert storage.retry(flaky, 1, y=2, what="GET s3://b/k", base_delay=0.01) == 3
    assert len(calls) == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "sdpo.storage"]
    assert len(lines) == 2 and lines[0].startswith("storage: GET s3://b/k failed (ConnectionResetError")
    assert "retry 1/4 in" in lines[0] and "retry 2/4 in" in lines[1]


def test_retry_fails_at_once_on_permanent_errors_and_passes_bugs_through():
    calls = []

    def denied():
        calls.append(1)
        raise _translated("AccessDenied", 403, PermissionError("Access Denied"))

    with pytest.raises(StorageError) as info:
        storage.retry(denied, what="PUT s3://bkt/run/summary.json")
    assert len(calls) == 1 and info.value.reason == "access-denied"
    assert "s3://bkt/run/summary.json" in str(info.value) and "AWS_PROFILE" in str(info.value)

    def bug():
        calls.append(1)
        raise TypeError("a bug, not storage")

    with pytest.raises(TypeError):
        storage.retry(bug, what="PUT s3://b/k")
    assert len(calls) == 2


def test_retry_gives_up_after_the_attempts_naming_the_path():
    def down():
        raise _client_error("SlowDown", 503)

    with pytest.raises(StorageError, match=r"s3://b/k still failing after 3 attempts \(SlowDown\)") as info:
        storage.retry(down, what="PUT s3://b/k", attempts=3, base_delay=0.001)
    assert info.value.reason == "unavailable"


def test_redact():
    key_id, secret = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    cases = [
        f"using key {key_id} for s3://b", f"aws_secret_access_key={secret}", f'{{"secret": "{secret}"}}',
        f"AWS_SECRET_ACCESS_KEY: {secret}", "aws_session_token = IQoJb3JpZ2luX2VjEXAMPLETOKEN",
        f"https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={key_id}%2F2026"
        "&X-Amz-Signature=f1e2d3c4b5a69788&X-Amz-Expires=60",
        "https://user:hunter2pass@host.example/path",
    ]
    out = [storage.redact(c) for c in cases]
    for o in out:
        assert "[REDACTED]" in o
        assert key_id not in o and secret not in o and "hunter2pass" not in o and "f1e2d3c4b5a69788" not in o
        assert "IQoJb3JpZ2luX2VjEXAMPLETOKEN" not in o
    assert out[0] == "using key [REDACTED] for s3://b"
    assert "X-Amz-Expires=60" in out[5] and "host.example/path" in out[6]
    assert storage.redact("max_tokens=512 pad_token: <pad> s3://bucket/run") == \
        "max_tokens=512 pad_token: <pad> s3://bucket/run"


def test_paths():
    assert storage.join("s3://b", "run", "stage_0/") == "s3://b/run/stage_0"
    assert storage.join("s3://", "b", "k") == "s3://b/k"
    assert storage.join("/tmp/out/", "/a", "b") == "/tmp/out/a/b"
    assert storage.is_local("/x") and storage.is_local("file:///x") and not storage.is_local("s3://b/x")
    assert storage.abspath("s3://b/x") == "s3://b/x"
    assert storage.abspath("file:///tmp/x") == "/tmp/x" and os.path.isabs(storage.abspath("rel/x"))

    class FakeFs:  # duck-typed like pyarrow's filesystems
        def __init__(self, type_name):
            self.type_name = type_name

    assert storage.pyarrow_uri(FakeFs("s3"), "b/run/ckpt") == "s3://b/run/ckpt"
    assert storage.pyarrow_uri(FakeFs("local"), "/tmp/ckpt") == "/tmp/ckpt"


def test_importing_storage_pulls_in_no_heavy_module():
    import subprocess
    import sys

    code = ("import sys, sdpo.storage; heavy = {'fsspec', 's3fs', 'pyarrow', 'ray', 'torch'} & set(sys.modules); "
            "sys.exit(f'imported {heavy}' if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


# ----------------------------------------------------------------------------- local disk


def _stray_temp_files(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_local_atomic_writes_leave_no_temp_and_keep_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out" / "summary.json"
    storage.write_json_atomic(target, {"stage": 1, "path": tmp_path})  # default=str for the Path
    assert storage.read_json(target) == {"stage": 1, "path": str(tmp_path)}
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assert _stray_temp_files(target.parent) == []

    class Unprintable:
        def __str__(self):
            raise RuntimeError("cannot serialise")

    circular: dict = {}
    circular["self"] = circular
    for bad in ({"x": Unprintable()}, circular):
        with pytest.raises((RuntimeError, ValueError)):
            storage.write_json_atomic(target, bad)
        assert storage.read_json(target)["stage"] == 1

    def no_fsync(fd):  # the disk fails mid-write
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", no_fsync)
    with pytest.raises(StorageError, match=str(target)):
        storage.write_text_atomic(target, "half")
    monkeypatch.undo()
    assert storage.read_json(target)["stage"] == 1
    assert _stray_temp_files(target.parent) == []


def test_local_open_write_publishes_whole_on_clean_exit_only(tmp_path):
    target = tmp_path / "q" / "rejected_rows.jsonl"
    with storage.open_write(target) as f:
        f.write('{"row": 1}\n')
        assert not target.exists()  # readers never see a half file
    assert target.read_text() == '{"row": 1}\n'
    with pytest.raises(KeyError), storage.open_write(target) as f:
        f.write('{"row": 2}\n')
        raise KeyError("the producer failed")
    assert target.read_text() == '{"row": 1}\n'
    assert _stray_temp_files(target.parent) == []


def test_local_check_writable_and_tree_ops(tmp_path):
    out = tmp_path / "new" / "run"
    storage.check_writable(out)
    assert out.is_dir() and os.listdir(out) == []
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=str(blocker / "run")):
        storage.check_writable(blocker / "run")
    src = _make_tree(tmp_path / "src")
    assert storage.copy_dir(src, tmp_path / "dst") == ["config.json", "sub/deep/weights.bin", "tokenizer.json"]
    assert storage.tree_checksum(src) == storage.tree_checksum(tmp_path / "dst")
    (tmp_path / "dst" / "config.json").write_text("{}")
    assert storage.tree_checksum(src) != storage.tree_checksum(tmp_path / "dst")
    with pytest.raises(StorageNotFoundError, match="no files"):
        storage.tree_checksum(tmp_path / "missing")


def test_local_move_dir_renames_the_folder(tmp_path):
    src = _make_tree(tmp_path / "work" / "_target=t0")
    before = storage.tree_checksum(src)
    inode = os.stat(os.path.join(src, "sub", "deep", "weights.bin")).st_ino
    dst = tmp_path / "cache" / "scores" / "key"  # its parent does not exist yet
    storage.move_dir(src, dst)
    assert not os.path.exists(src)
    assert storage.tree_checksum(dst) == before
    assert os.stat(dst / "sub" / "deep" / "weights.bin").st_ino == inode, "a rename, not a copy"


def _make_tree(root) -> str:
    os.makedirs(os.path.join(root, "sub", "deep"))
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"hidden_size": 64}, f)
    with open(os.path.join(root, "tokenizer.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(root, "sub", "deep", "weights.bin"), "wb") as f:
        f.write(os.urandom(300_000))
    return str(root)


# ----------------------------------------------------------------------------- S3 server


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    return s3_server.make_bucket("sdpo-storage-test")


def test_s3_json_round_trip_and_listing(bucket):
    uri = storage.join(bucket, "run", "summary.json")
    storage.write_json_atomic(uri, {"stages": [1, 2], "ok": True})
    assert storage.read_json(uri) == {"stages": [1, 2], "ok": True}
    assert storage.exists(uri) and not storage.isdir(uri)
    assert storage.isdir(storage.join(bucket, "run"))
    assert storage.listdir(storage.join(bucket, "run")) == ["summary.json"]
    storage.remove(storage.join(bucket, "run"))
    assert not storage.exists(uri)
    storage.remove(storage.join(bucket, "run"))  # missing is fine


def test_s3_missing_key_names_the_key(bucket):
    uri = storage.join(bucket, "nowhere", "summary.json")
    with pytest.raises(StorageNotFoundError, match="s3://sdpo-storage-test/nowhere/summary.json") as info:
        storage.read_json(uri)
    assert isinstance(info.value, FileNotFoundError) and info.value.reason == "not-found"


def test_s3_check_writable_fails_fast_on_a_missing_bucket(bucket, s3_server):
    storage.check_writable(storage.join(bucket, "run"))
    assert not storage.exists(storage.join(bucket, "run"))  # the probe is gone
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.check_writable("s3://no-such-bucket-here/exp/run1")
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert "bucket 'no-such-bucket-here' does not exist" in msg and "s3://no-such-bucket-here/exp/run1" in msg
    assert "create it or fix the output path" in msg and info.value.reason == "missing-bucket"


def test_s3_trees_round_trip_with_equal_checksums(bucket, tmp_path):
    src = _make_tree(tmp_path / "model")
    remote = storage.join(bucket, "models", "stage_0")
    files = storage.upload_dir(src, remote)
    assert files == ["config.json", "sub/deep/weights.bin", "tokenizer.json"]
    assert storage.tree_checksum(remote) == storage.tree_checksum(src)
    assert storage.file_checksum(storage.join(remote, "sub/deep/weights.bin")) == \
        storage.file_checksum(os.path.join(src, "sub", "deep", "weights.bin"))
    copy = storage.join(bucket, "models", "stage_0_copy")
    assert storage.copy_dir(remote, copy) == files  # server-side copy
    back = tmp_path / "back"
    assert storage.download_dir(copy, back) == files
    assert storage.tree_checksum(back) == storage.tree_checksum(src) == storage.tree_checksum(copy)


def test_s3_move_dir_copies_then_removes(bucket, tmp_path):
    src = _make_tree(tmp_path / "model")
    remote = storage.join(bucket, "work", "_target=t1")
    storage.upload_dir(src, remote)
    dst = storage.join(bucket, "cache", "scores", "key")
    storage.move_dir(remote, dst)
    assert not storage.exists(remote)
    assert storage.tree_checksum(dst) == storage.tree_checksum(src)
    local = tmp_path / "local_copy"
    storage.move_dir(dst, local)  # from the store to a local folder
    assert not storage.exists(dst) and storage.tree_checksum(local) == storage.tree_checksum(src)


def test_s3_open_write_streams_a_jsonl_file(bucket):
    uri = storage.join(bucket, "run", "rejected_rows.jsonl")
    with storage.open_write(uri) as f:
        for i in range(3):
            f.write(json.dumps({"row": i}) + "\n")
        assert not storage.exists(uri)
    assert [json.loads(x)["row"] for x in storage.read_text(uri).splitlines()] == [0, 1, 2]


def test_pyarrow_fs_writes_and_reads_on_the_server(bucket):
    uri = storage.join(bucket, "arrow", "blob.bin")
    fs, path = storage.pyarrow_fs(uri)
    assert fs.type_name == "s3" and path == "sdpo-storage-test/arrow/blob.bin"
    with fs.open_output_stream(path) as f:
        f.write(b"written by pyarrow")
    assert storage.read_bytes(uri) == b"written by pyarrow"
    with fs.open_input_stream(path) as f:
        assert f.read() == b"written by pyarrow"
    from pyarrow.fs import FileSelector

    assert [i.path for i in fs.get_file_info(FileSelector("sdpo-storage-test/arrow"))] == [path]
    assert storage.pyarrow_uri(fs, path) == uri
    # pyarrow (and so Ray) writes "folder/" marker objects: they are neither children nor files
    fs.create_dir("sdpo-storage-test/arrow/sub")
    with fs.open_output_stream("sdpo-storage-test/arrow/sub/x.txt") as f:
        f.write(b"x")
    assert storage.listdir(storage.join(bucket, "arrow")) == ["blob.bin", "sub"]
    assert storage.listdir(storage.join(bucket, "arrow", "sub")) == ["x.txt"]
    assert storage.copy_dir(storage.join(bucket, "arrow"), storage.join(bucket, "arrow2")) == \
        ["blob.bin", "sub/x.txt"]


# ----------------------------------------------------------------------------- transient failures


@pytest.fixture
def flaky(s3_server, monkeypatch):
    """A FlakyProxy in front of the server with AWS_ENDPOINT_URL pointing at it. botocore's own retries
    are off (AWS_MAX_ATTEMPTS=1); s3fs still retries SlowDown 5 times itself, so tests fail more."""
    with FlakyProxy(s3_server.endpoint, fail_first=0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        clear_fs_caches()
        yield proxy
        monkeypatch.undo()
        clear_fs_caches()


def _retry_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sdpo.storage" and r.levelno == logging.WARNING]


def test_slowdown_beyond_the_inner_retries_is_retried_and_logged(bucket, flaky, caplog):
    uri = storage.join(bucket, "flaky", "summary.json")
    flaky.set(6, match=lambda method, path: method == "PUT")  # s3fs absorbs 5, ours the 6th
    with caplog.at_level(logging.WARNING, logger="sdpo.storage"):
        storage.write_json_atomic(uri, {"ok": 1})
    assert flaky.failed == 6
    assert len(_retry_lines(caplog)) == 1
    assert _retry_lines(caplog)[0].startswith(f"storage: PUT {uri} failed (SlowDown); retry 1/4 in ")
    flaky.set(0)
    assert storage.read_json(uri) == {"ok": 1}


def test_connection_resets_are_retried_and_logged(bucket, flaky, caplog):
    uri = storage.join(bucket, "flaky", "model")
    flaky.set(2, reset=True, match=lambda method, path: method == "HEAD")
    with caplog.at_level(logging.WARNING, logger="sdpo.storage"):
        storage.write_text_atomic(storage.join(uri, "config.json"), "{}")
        assert storage.exists(storage.join(uri, "config.json"))
    assert flaky.failed == 2 and [r for r in flaky.requests if r[2] == "reset"]
    # aiohttp itself retries an idempotent request once when a reused keep-alive connection drops,
    # so the two resets reach us as one or two failures
    lines = _retry_lines(caplog)
    assert 1 <= len(lines) <= 2
    assert all(line.startswith(f"storage: HEAD {uri}/config.json failed (EndpointConnectionError") for line in lines)


def test_an_outage_outlasting_the_attempts_names_the_path(bucket, flaky):
    uri = storage.join(bucket, "flaky", "never.json")
    flaky.set(math.inf)
    start = time.monotonic()
    with pytest.raises(StorageError, match="s3://sdpo-storage-test/flaky/never.json still failing after 5") as info:
        storage.read_json(uri)
    assert info.value.reason == "unavailable" and "AWS_ENDPOINT_URL" in str(info.value)
    assert time.monotonic() - start < 15


# ----------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_s3(s3_server, tmp_path_factory):
    """A local Ray started after `s3_server` set the AWS environment, which its workers inherit."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.data import DataContext

    from sdpo.pipeline import local_ray_options

    ray.init(num_cpus=2, include_dashboard=False, **local_ray_options(2), object_store_memory=200 * 2**20,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.mark.timeout(120)
def test_ray_data_parquet_on_s3(ray_s3, bucket):
    import ray

    uri = storage.join(bucket, "data", "pairs")
    ray.data.from_items([{"id": i, "prompt": f"p{i}"} for i in range(20)]).write_parquet(uri)
    assert any(n.endswith(".parquet") for n in storage.listdir(uri))
    back = ray.data.read_parquet(uri)
    assert sorted(r["id"] for r in back.take_all()) == list(range(20))


def _report_one_checkpoint(config):
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "weights.txt"), "w") as f:
            f.write(config["payload"])
        ray.train.report({"loss": 0.5}, checkpoint=ray.train.Checkpoint.from_directory(d))


@pytest.mark.timeout(180)
def test_ray_train_checkpoints_on_s3(ray_s3, bucket, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(_report_one_checkpoint, train_loop_config={"payload": "stage-0"},
                           scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="storage-test", storage_path=storage.join(bucket, "train")))
    result = trainer.fit()
    ckpt = result.checkpoint
    assert ckpt is not None
    # pyarrow strips the scheme: the path is "bucket/...", the filesystem says it is S3
    assert ckpt.path.startswith("sdpo-storage-test/train/storage-test/") and "://" not in ckpt.path
    assert ckpt.filesystem.type_name == "s3"
    uri = storage.pyarrow_uri(ckpt.filesystem, ckpt.path)
    assert storage.listdir(uri) == ["weights.txt"]
    assert storage.read_text(storage.join(uri, "weights.txt")) == "stage-0"
    local = ckpt.to_directory(str(tmp_path / "ckpt"))
    with open(os.path.join(local, "weights.txt")) as f:
        assert f.read() == "stage-0"

