"""Run output on any filesystem: local paths or `scheme://` URIs (s3, gs, memory, ...), through fsspec.

Everything a run writes (summary.json, stage models, reference caches, the report, rejected_rows.jsonl)
goes through the functions below, which take URI strings (or local `os.PathLike`s). No Ray, no torch;
fsspec is imported at first use, so importing this module costs milliseconds.

Endpoint and credentials come only from the standard AWS environment/config, never from arguments:
- s3fs (every function here but `pyarrow_fs`) is built with no options: botocore itself reads
  `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (or `endpoint_url` in the profile's config), the
  credentials (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, `AWS_PROFILE`, ...)
  and the region. Checked with s3fs 2026.9 / botocore 1.43.
- pyarrow (Ray Train's `storage_path`, Ray Data's `read_*`/`write_*`): `FileSystem.from_uri("s3://...")`
  honours `AWS_ENDPOINT_URL`, but `pyarrow.fs.S3FileSystem()` built directly does NOT (pyarrow 26), nor
  does pyarrow read a profile's `endpoint_url`. `pyarrow_fs` reads the variables in one place
  (`s3_endpoint`) and passes `endpoint_override`; an `http://` endpoint selects plain HTTP by itself.
  Ray Train with `RunConfig(storage_path="s3://...")` needs no `storage_filesystem` when the variable is
  set before `ray.init` (workers inherit the driver's environment). On S3 a `Checkpoint.path` comes back
  without its scheme: `pyarrow_uri(checkpoint.filesystem, checkpoint.path)` rebuilds the URI.

Retries. A failed storage call is classified (`classify`): transient errors (throttling/SlowDown,
5xx, request timeouts, connection resets, timeouts) are retried with exponential backoff and jitter,
each retry logged at WARNING on the `sdpo.storage` logger; permanent ones (missing bucket or key,
access denied, bad credentials) fail at once as `StorageError` whose message names the URI and says what
would fix it. There are three layers, innermost first: botocore (`AWS_MAX_ATTEMPTS`, `AWS_RETRY_MODE`;
legacy mode tries 5 times), s3fs (5 tries per call, ~2 s in all) and `retry` here (whole operation,
5 attempts). Our layer is the one that names the path, logs, and recovers from outages of seconds.
Multi-file operations retry per file, so one failure does not redo a whole model upload.

API (a `uri` is a local path, `file://...` or `scheme://...`):
    is_local(uri) -> bool                      a local path (no scheme, or file://)
    join(uri, *parts) -> str                   posix join that keeps `s3://`
    abspath(uri) -> str                        local paths made absolute, URLs unchanged
    fs_and_path(uri) -> (fs, path)             fsspec `url_to_fs`
    exists / isdir(uri) -> bool                never served from a stale listing cache
    listdir(uri) -> list[str]                  sorted child names
    remove(uri, recursive=True)                a missing path is fine
    read_bytes / read_text / read_json(uri)
    write_text_atomic / write_json_atomic(uri, ...)   whole or not at all (local: temp + fsync +
                                               os.replace; object stores: one PUT)
    open_write(uri)                            context manager for streamed text (a JSONL file):
                                               spooled locally, published whole on a clean exit
    copy_dir(src, dst) -> list[str]            a tree of files, any local/remote combination
    upload_dir(local_dir, uri) / download_dir(uri, local_dir)
    file_checksum(uri) / tree_checksum(uri) -> str    sha256 of a file / of a folder's paths and bytes
    check_writable(uri)                        fail-fast probe before any compute
    retry(fn, *args, what=..., attempts=5, ...)       the retry loop all of the above use
    classify(exc) -> "transient" | "permanent"
    redact(text) -> str                        secrets removed from a string about to be logged
    s3_endpoint() -> str | None                the S3 endpoint from the environment
    pyarrow_fs(uri) -> (pyarrow FileSystem, path)     for Ray Train / Ray Data
    pyarrow_uri(filesystem, path) -> str       a (pyarrow filesystem, path) pair back to a URI
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar

if TYPE_CHECKING:
    import pyarrow.fs
    from fsspec import AbstractFileSystem

log = logging.getLogger("sdpo.storage")

T = TypeVar("T")
Uri: TypeAlias = "str | os.PathLike[str]"
Kind = Literal["transient", "permanent"]

# ----------------------------------------------------------------------------- errors


class StorageError(OSError):
    """A storage operation failed for good; the message names the URI and says what would fix it.

    `uri` is the path concerned; `reason` one of missing-bucket, not-found, access-denied,
    credentials, unavailable (transient errors outlasted the retries), failed.
    """

    def __init__(self, message: str, *, uri: str = "", reason: str = "failed"):
        super().__init__(message)
        self.uri = uri
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0])


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The file, object or bucket does not exist (also a `FileNotFoundError`)."""


# S3/AWS error codes and HTTP statuses worth retrying; every other code is permanent.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "ProvisionedThroughputExceededException", "BandwidthLimitExceeded", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable", "OperationAborted",
    "PriorRequestNotComplete", "429", "500", "502", "503", "504",
})
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
# connection-level exception classes of botocore, aiobotocore, aiohttp and fsspec, matched by name so
# that classifying needs none of them imported
_TRANSIENT_TYPES = frozenset({
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ResponseStreamingError", "IncompleteReadError", "IncompleteRead", "ProxyConnectionError",
    "ServerDisconnectedError", "ClientPayloadError", "ClientConnectionError", "ClientOSError",
    "ServerTimeoutError", "FSTimeoutError", "TimeoutError", "ConnectionError",
})
_CREDENTIAL_TYPES = frozenset({"NoCredentialsError", "PartialCredentialsError", "ProfileNotFound",
                               "CredentialRetrievalError", "UnauthorizedSSOTokenError"})
_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                               "InvalidToken", "TokenRefreshRequired", "ExpiredTokenException"})
_TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ECONNABORTED,
                               errno.ECONNREFUSED})
_PERMANENT_TYPES = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError,
                    NotADirectoryError)
# pyarrow (AWS C++ SDK) reports S3 errors as OSError text only
_TRANSIENT_TEXT = re.compile(
    r"SLOW_DOWN|SlowDown|reduce your request rate|SERVICE_UNAVAILABLE|ServiceUnavailable|THROTTL|"
    r"Throttl|NETWORK_CONNECTION|REQUEST_TIMEOUT|RequestTimeout|INTERNAL_FAILURE|Connection reset")
_STORAGE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs",
                    "urllib3", "requests", "pyarrow")


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what caused it, outermost first (s3fs raises OSErrors `from` botocore's ClientError)."""
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in out and len(out) < 12:
        out.append(e)
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    return out


def _aws_error(exc: BaseException) -> tuple[str, int | None, dict]:
    """(error code, HTTP status, the error dict) of a botocore ClientError, duck-typed; ("", None, {})."""
    resp = getattr(exc, "response", None)
    if not isinstance(resp, dict):
        return "", None, {}
    err = resp.get("Error") or {}
    status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return str(err.get("Code") or ""), status if isinstance(status, int) else None, err


def _type_names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def classify(exc: BaseException) -> Kind:
    """Whether retrying `exc` can help. Pure: looks at the exception, its causes, codes and errnos."""
    if isinstance(exc, StorageError):  # already retried (or diagnosed) below us: never again
        return "permanent"
    chain = _chain(exc)
    for e in chain:  # a server's explicit error code is the most reliable signal
        code, status, _ = _aws_error(e)
        if code or status:
            return "transient" if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS else "permanent"
    for e in chain:
        if isinstance(e, _PERMANENT_TYPES):
            return "permanent"
        names = _type_names(e)
        if names & _CREDENTIAL_TYPES:
            return "permanent"
        if names & _TRANSIENT_TYPES:
            return "transient"
        if isinstance(e, OSError):
            if e.errno in _TRANSIENT_ERRNOS:
                return "transient"
            if _TRANSIENT_TEXT.search(str(e)):
                return "transient"
    return "permanent"


def _is_storage_exception(exc: BaseException) -> bool:
    """OSErrors and the storage libraries' own errors; anything else (a TypeError) is a bug, not I/O."""
    if isinstance(exc, OSError):
        return True
    return any(c.__module__.split(".")[0] in _STORAGE_MODULES for c in type(exc).__mro__)


def _short(exc: BaseException) -> str:
    for e in _chain(exc):
        code, status, _ = _aws_error(e)
        if code or status:
            return code or f"HTTP {status}"
    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_URI_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+|/\S+")


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[1].split("/", 1)[0] if "://" in uri else ""


def _diagnose(exc: BaseException, what: str, attempts: int | None = None) -> StorageError:
    """The StorageError to raise for `exc`: names the URI (the first in `what`) and the fix."""
    m = _URI_IN_TEXT.search(what)
    uri = m.group(0) if m else what
    codes = {_aws_error(e)[0] for e in _chain(exc)} - {""}
    errs = [_aws_error(e)[2] for e in _chain(exc) if _aws_error(e)[2]]
    names = set().union(*(_type_names(e) for e in _chain(exc)))
    detail = _short(exc)
    text = " ".join(str(e) for e in _chain(exc)).lower()
    cls: type[StorageError] = StorageError
    if attempts is not None:
        reason, msg = "unavailable", (
            f"{what} still failing after {attempts} attempts ({detail}): the storage service is "
            "unavailable or throttling; check AWS_ENDPOINT_URL and the network, or retry later")
    elif "NoSuchBucket" in codes or "bucket does not exist" in text or "NO_SUCH_BUCKET" in text.upper():
        bucket = next((str(e["BucketName"]) for e in errs if e.get("BucketName")), "") or _bucket(uri)
        cls, reason, msg = StorageNotFoundError, "missing-bucket", (
            f"{what} failed: bucket {bucket!r} does not exist: create it or fix the output path ({uri})")
    elif codes & _CREDENTIAL_CODES or names & _CREDENTIAL_TYPES:
        reason, msg = "credentials", (
            f"{what} failed: the credentials were missing or rejected ({detail}): set AWS_PROFILE or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones), or refresh them")
    elif "PermissionError" in names or codes & {"AccessDenied", "403", "AllAccessDisabled"}:
        reason = "access-denied"
        msg = (f"{what} failed: access denied to {uri}: check the credentials/profile (AWS_PROFILE, "
               "AWS_ACCESS_KEY_ID) and the bucket policy") if "://" in uri else (
               f"{what} failed: permission denied on {uri}: check the folder's owner and mode")
    elif "FileNotFoundError" in names or codes & {"NoSuchKey", "404", "NotFound"}:
        cls, reason, msg = StorageNotFoundError, "not-found", (
            f"{what} failed: {uri} does not exist: check the path (is it the output folder of the run "
            "that wrote it?)")
    else:
        reason, msg = "failed", f"{what} failed ({detail})"
    return cls(redact(msg), uri=redact(uri), reason=reason)


# ----------------------------------------------------------------------------- retry


def retry(fn: Callable[..., T], *args: Any, what: str, attempts: int = 5, base_delay: float = 0.2,
          max_delay: float = 5.0, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, retrying transient storage errors with exponential backoff and jitter.

    `what` is "<operation> <uri>" ("PUT s3://b/k"): it names the operation in logs and errors.
    Permanent storage errors, and transient ones on the last attempt, raise `StorageError`; errors
    that are not about storage at all (a TypeError) propagate unchanged.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except StorageError:
            raise
        except Exception as exc:
            if not _is_storage_exception(exc):
                raise
            if classify(exc) == "permanent":
                raise _diagnose(exc, what) from exc
            if attempt == attempts:
                raise _diagnose(exc, what, attempts=attempts) from exc
            delay = min(max_delay, base_delay * 2 ** (attempt - 1) * random.uniform(0.75, 1.25))
            log.warning("storage: %s failed (%s); retry %d/%d in %.1fs", redact(what),
                        redact(_short(exc)), attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- paths

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})


def _scheme(uri: str) -> str:
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else ""


def is_local(uri: Uri) -> bool:
    """True for a plain path or a `file://` URI."""
    return _scheme(os.fspath(uri)) in ("", "file", "local")


def join(uri: Uri, *parts: str) -> str:
    """Posix join that keeps `s3://` (parts are relative; their outer slashes are dropped)."""
    out = os.fspath(uri)
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = out + part if out.endswith("://") else out.rstrip("/") + "/" + part
    return out


def abspath(uri: Uri) -> str:
    """A local path made absolute (`file://` dropped, `~` expanded); a URL unchanged."""
    s = os.fspath(uri)
    if not is_local(s):
        return s
    s = _SCHEME.sub("", s, count=1)
    return os.path.abspath(os.path.expanduser(s))


def fs_and_path(uri: Uri) -> tuple[AbstractFileSystem, str]:
    """fsspec's filesystem (cached per process by fsspec) and the path within it."""
    from fsspec.core import url_to_fs

    return url_to_fs(abspath(uri))


def s3_endpoint() -> str | None:
    """The S3 endpoint the AWS environment names (AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL), as botocore
    reads it; None for AWS itself or when AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true."""
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _protocol(fs: AbstractFileSystem) -> str:
    p = fs.protocol
    return (p if isinstance(p, str) else p[0]).lower()


# ----------------------------------------------------------------------------- reads


def _info(uri: Uri) -> dict | None:
    fs, path = fs_and_path(uri)

    def op() -> dict | None:
        fs.invalidate_cache(path)  # another process (a Ray worker) may have written it since
        try:
            return fs.info(path)
        except FileNotFoundError:
            return None

    return retry(op, what=f"HEAD {uri}")


def exists(uri: Uri) -> bool:
    """Whether a file or folder exists (a missing bucket counts as missing; other errors raise)."""
    return _info(uri) is not None


def isdir(uri: Uri) -> bool:
    info = _info(uri)
    return info is not None and info.get("type") == "directory"


def listdir(uri: Uri) -> list[str]:
    """Sorted names of a folder's children; StorageNotFoundError if it does not exist."""
    fs, path = fs_and_path(uri)

    def op() -> list[str]:
        fs.invalidate_cache(path)
        here = path.rstrip("/")  # an object store may list the folder's own marker object ("dir/")
        return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)
                       if str(e).rstrip("/") != here})

    return retry(op, what=f"LIST {uri}")


def remove(uri: Uri, recursive: bool = True) -> None:
    """Delete a file or (recursively) a folder; a missing path is fine."""
    fs, path = fs_and_path(uri)

    def op() -> None:
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(path)

    retry(op, what=f"DELETE {uri}")


def read_bytes(uri: Uri) -> bytes:
    fs, path = fs_and_path(uri)
    return retry(fs.cat_file, path, what=f"GET {uri}")


def read_text(uri: Uri, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def read_json(uri: Uri) -> Any:
    return json.loads(read_text(uri))


# ----------------------------------------------------------------------------- writes

_NEW_FILE_MODE = 0o644  # mkstemp makes 0600 files; a replaced file keeps its own mode


def _local_publish(tmp: str, path: str) -> None:
    """Move a finished temp file over `path` atomically and make the rename durable."""
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else _NEW_FILE_MODE
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        dfd = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _write_local_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _local_publish(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _write_bytes_atomic(uri: Uri, data: bytes) -> None:
    if is_local(uri):
        retry(_write_local_atomic, abspath(uri), data, what=f"WRITE {abspath(uri)}")
    else:  # an object appears whole: one PUT (s3fs uses a multipart upload only past 100 MiB)
        fs, path = fs_and_path(uri)
        retry(fs.pipe_file, path, data, what=f"PUT {uri}")


def write_text_atomic(uri: Uri, text: str, encoding: str = "utf-8") -> None:
    """Write a whole text file; readers see the old content or the new, never half of it."""
    _write_bytes_atomic(uri, text.encode(encoding))


def write_json_atomic(uri: Uri, data: Any) -> None:
    """`data` as indented JSON (`default=str`), atomically. Serialised first: a value that cannot be
    serialised raises before anything is touched, leaving the previous file intact."""
    write_text_atomic(uri, json.dumps(data, indent=2, default=str) + "\n")


@contextlib.contextmanager
def open_write(uri: Uri, encoding: str = "utf-8") -> Iterator[IO[str]]:
    """Stream text into `uri`. It goes to a local temp file (beside the target when local) and is
    published whole when the block exits cleanly (a rename, or one upload with retries); if the
    block raises, the target is untouched."""
    local = is_local(uri)
    path = abspath(uri)
    if local:
        retry(os.makedirs, os.path.dirname(path), exist_ok=True, what=f"MKDIR {os.path.dirname(path)}")
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) if local else None,
                               prefix=f".{os.path.basename(path.rstrip('/'))}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding=encoding, newline="") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if local:
            retry(_local_publish, tmp, path, what=f"WRITE {path}")
        else:
            fs, fpath = fs_and_path(uri)
            retry(fs.put_file, tmp, fpath, what=f"PUT {uri}")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- trees


def _list_files(uri: Uri) -> dict[str, str]:
    """{relative posix path: path on its filesystem} of every file under a folder."""
    fs, root = fs_and_path(uri)

    def op() -> dict[str, str]:
        fs.invalidate_cache()
        found = fs.find(root, detail=False)
        root_ = root.rstrip("/") + "/"
        return {p[len(root_):]: p for p in found if p.startswith(root_) and not p.endswith("/")}

    files = retry(op, what=f"LIST {uri}")
    if not files:
        raise StorageNotFoundError(f"{uri} has no files (a missing or empty folder, or a file): "
                                   "check the path", uri=str(uri), reason="not-found")
    return dict(sorted(files.items()))


def _get_local(fs: AbstractFileSystem, src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    fs.get_file(src, dst)


def _copy_local(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst)


def _copy_via_spool(sfs: AbstractFileSystem, src: str, dfs: AbstractFileSystem, dst: str) -> None:
    with tempfile.TemporaryDirectory(prefix="sdpo-copy-") as d:
        local = os.path.join(d, "f")
        sfs.get_file(src, local)
        dfs.put_file(local, dst)


def copy_dir(src_uri: Uri, dst_uri: Uri) -> list[str]:
    """Copy every file under `src_uri` to the same relative path under `dst_uri` (local or remote,
    either side); returns the relative paths. Files already under dst that src lacks are left alone:
    `remove(dst)` first for an exact mirror. Each file is retried on its own."""
    files = _list_files(src_uri)
    sfs, _ = fs_and_path(src_uri)
    dfs, droot = fs_and_path(dst_uri)
    src_local, dst_local = is_local(src_uri), is_local(dst_uri)
    for rel, spath in files.items():
        dpath = droot.rstrip("/") + "/" + rel
        s, d = join(src_uri, rel), join(dst_uri, rel)
        if src_local and dst_local:
            retry(_copy_local, spath, dpath, what=f"WRITE {d} (from {s})")
        elif src_local:
            retry(dfs.put_file, spath, dpath, what=f"PUT {d} (from {s})")
        elif dst_local:
            retry(_get_local, sfs, spath, dpath, what=f"GET {s} (to {d})")
        elif sfs is dfs:  # same store: a server-side copy
            retry(dfs.copy, spath, dpath, what=f"COPY {d} (from {s})")
        else:
            retry(_copy_via_spool, sfs, spath, dfs, dpath, what=f"COPY {d} (from {s})")
    if not dst_local:
        dfs.invalidate_cache()
    return list(files)


def move_dir(src_uri: Uri, dst_uri: Uri) -> None:
    """Move the folder `src_uri` to `dst_uri` (which must not exist): a rename where both are on one
    local filesystem, else `copy_dir` and `remove(src)`."""
    if is_local(src_uri) and is_local(dst_uri):
        src, dst = abspath(src_uri), abspath(dst_uri)
        os.makedirs(os.path.dirname(dst.rstrip("/")), exist_ok=True)
        try:
            os.rename(src, dst)
            return
        except OSError as err:
            if err.errno != errno.EXDEV:  # another device: copy below
                raise
    copy_dir(src_uri, dst_uri)
    remove(src_uri)


def upload_dir(local_dir: Uri, uri: Uri) -> list[str]:
    """`copy_dir` from a local folder."""
    if not is_local(local_dir):
        raise ValueError(f"upload_dir: {local_dir} is not a local folder; use copy_dir")
    return copy_dir(local_dir, uri)


def download_dir(uri: Uri, local_dir: Uri) -> list[str]:
    """`copy_dir` into a local folder."""
    if not is_local(local_dir):
        raise ValueError(f"download_dir: {local_dir} is not a local folder; use copy_dir")
    return copy_dir(uri, local_dir)


def _sha256(fs: AbstractFileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_checksum(uri: Uri) -> str:
    """sha256 (hex) of one file's bytes."""
    fs, path = fs_and_path(uri)
    return retry(_sha256, fs, path, what=f"GET {uri}")


def tree_checksum(uri: Uri) -> str:
    """sha256 over the sorted relative paths and the bytes of every file under a folder: equal on
    both sides of a `copy_dir`. A missing or empty folder raises StorageNotFoundError."""
    fs, _ = fs_and_path(uri)
    h = hashlib.sha256()
    for rel, path in _list_files(uri).items():
        digest = retry(_sha256, fs, path, what=f"GET {join(uri, rel)}")
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def check_writable(uri: Uri) -> None:
    """Fail fast, before any compute, if `uri` cannot take output: a local folder is created, and a
    small probe object is written and deleted (on S3 this proves the bucket exists and the
    credentials may write there). Raises StorageError naming the path."""
    probe = join(uri, f".sdpo-write-probe-{uuid.uuid4().hex[:12]}")
    try:
        if is_local(uri):
            retry(os.makedirs, abspath(uri), exist_ok=True, what=f"MKDIR {abspath(uri)}")
        fs, path = fs_and_path(probe)
        if not is_local(uri) and _protocol(fs) not in _OBJECT_STORES:
            retry(fs.makedirs, fs._parent(path), exist_ok=True, what=f"MKDIR {uri}")
        retry(fs.pipe_file, path, b"sdpo write probe\n", what=f"PUT {probe}")
        retry(fs.rm_file, path, what=f"DELETE {probe}")
    except StorageError as e:
        raise type(e)(f"output location {abspath(uri)} is not writable: {e}", uri=abspath(uri),
                      reason=e.reason) from e


# ----------------------------------------------------------------------------- pyarrow (Ray)


def pyarrow_fs(uri: Uri) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem and path for Ray (`RunConfig(storage_filesystem=...)` with the returned
    path as `storage_path`, Ray Data's `filesystem=`). S3 honours `s3_endpoint()` and the AWS region
    variables; schemes pyarrow lacks go through fsspec (`PyFileSystem(FSSpecHandler(...))`)."""
    import pyarrow
    import pyarrow.fs as pafs

    s = abspath(uri)
    if is_local(s):
        return pafs.LocalFileSystem(), s
    endpoint = s3_endpoint()
    if _scheme(s) in ("s3", "s3a") and endpoint:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        options: dict[str, Any] = {"endpoint_override": endpoint}
        if region:
            options["region"] = region
        return pafs.S3FileSystem(**options), s.split("://", 1)[1].rstrip("/")
    try:  # from_uri may ask S3 for the bucket's region: storage I/O
        return retry(pafs.FileSystem.from_uri, s, what=f"OPEN {s}")
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError):
        fs, path = fs_and_path(s)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def pyarrow_uri(filesystem: Any, path: str) -> str:
    """The URI of `path` on a pyarrow filesystem: puts back the scheme that pyarrow (and so a Ray
    `Checkpoint.path` on S3) strips. Duck-typed on `type_name`; pyarrow is not imported."""
    kind = getattr(filesystem, "type_name", "local")
    if kind == "local":
        return path
    if kind == "py":
        return filesystem.handler.fs.unstrip_protocol(path)
    scheme = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}.get(kind, kind)
    return f"{scheme}://{path.lstrip('/')}"


# ----------------------------------------------------------------------------- redaction

_REDACTED = "[REDACTED]"
_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA|ABIA|ACCA)[A-Z0-9]{16}\b")
_SECRET_KV = re.compile(
    r"""(?P<k>["']?\b(?:aws_)?(?:secret_?access_?key|session_?token|security_?token|secret|password|passwd)"""
    r"""["']?)(?P<sep>\s*[=:]\s*)(?P<q>["']?)(?P<v>[^\s"'&,;}]+)""", re.IGNORECASE)
_URL_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@:]+(?::[^/\s@]*)?@")
_QUERY_SECRET = re.compile(
    r"\b((?:X-Amz-)?(?:Signature|Credential|Security-Token)|AWSAccessKeyId)=([^&\s\"',]+)", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` without secrets: AWS access key ids, `secret_access_key=`/`"secret": ...`/session tokens/
    passwords, `user:password@` in URLs, presigned-URL signatures and credentials."""
    text = _URL_USERINFO.sub(rf"\1{_REDACTED}@", text)
    text = _QUERY_SECRET.sub(rf"\1={_REDACTED}", text)
    text = _SECRET_KV.sub(rf"\g<k>\g<sep>\g<q>{_REDACTED}", text)
    return _KEY_ID.sub(_REDACTED, text)
