"""A real S3-compatible server on loopback for tests (moto in server mode), and a flaky proxy in front of it.

`running_s3_server()` starts moto on a free 127.0.0.1 port and points the standard AWS environment at
it (AWS_ENDPOINT_URL, test credentials, us-east-1; AWS_PROFILE and the config files out of the way),
so everything started afterwards, Ray workers included, talks to it. `FlakyProxy` answers its first N
requests with an S3 503 SlowDown (or resets the connection) and forwards the rest to the server: the
way to test retries against real s3fs/botocore/pyarrow clients.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# the variables this module sets, plus those that would override them (restored at the end)
_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
             "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
             "AWS_EC2_METADATA_DISABLED", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")


def clear_fs_caches() -> None:
    """Forget cached s3fs instances: each holds a botocore client bound to the endpoint of its time."""
    with contextlib.suppress(ImportError):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


class S3Server:
    """moto's S3 on 127.0.0.1. `endpoint` is its URL; `make_bucket(name)` returns "s3://name"."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def make_bucket(self, name: str) -> str:
        """Create a bucket (idempotent); bucket names are 3-63 lowercase letters, digits, dots, dashes."""
        status = self._request("PUT", f"/{name}")
        if status not in (200, 409):
            raise RuntimeError(f"creating bucket {name!r} on {self.endpoint}: HTTP {status}")
        return f"s3://{name}"

    def reset(self) -> None:
        """Drop every bucket and object."""
        self._request("POST", "/moto-api/reset")

    def stop(self) -> None:
        self._server.stop()

    def _request(self, method: str, path: str) -> int:
        host, port = self._server.get_host_and_port()
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:  # moto does not check signatures, so no credentials are needed here
            conn.request(method, path, body=b"")
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()


@contextlib.contextmanager
def running_s3_server(tmp_dir: str | None = None) -> Iterator[S3Server]:
    """Start moto, point the AWS environment at it, yield the server; restore the environment after."""
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    server = S3Server()
    missing = os.path.join(tmp_dir or "/nonexistent", "no-aws-config")
    try:
        for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                  "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
            os.environ.pop(k, None)
        os.environ.update({
            "AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            # a developer's ~/.aws must not leak in; no instance-metadata lookups
            "AWS_CONFIG_FILE": missing, "AWS_SHARED_CREDENTIALS_FILE": missing,
            "AWS_EC2_METADATA_DISABLED": "true",
        })
        clear_fs_caches()
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        clear_fs_caches()


# ----------------------------------------------------------------------------- flaky proxy

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "expect"}
_SLOWDOWN = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>"
             "<Message>Please reduce your request rate.</Message><RequestId>flaky-proxy</RequestId></Error>")


class FlakyProxy:
    """A loopback HTTP proxy in front of `target_endpoint` that fails its first `fail_first` matching
    requests, then forwards everything.

    A failure is an S3-style error (`status`, default 503 with code SlowDown) or, with `reset=True`,
    a TCP reset. `match(method, path)` limits which requests count (default: all). `fail_first` may be
    `math.inf`. `requests` logs (method, path, status or "reset") for every request seen.
    """

    def __init__(self, target_endpoint: str, fail_first: float = 1, status: int = 503,
                 code: str = "SlowDown", reset: bool = False,
                 match: Callable[[str, str], bool] | None = None) -> None:
        self.target = target_endpoint.split("://", 1)[1].rstrip("/")
        self.fail_first, self.status, self.code, self.reset = fail_first, status, code, reset
        self.match = match or (lambda method, path: True)
        self.failed = 0
        self.requests: list[tuple[str, str, int | str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, client_address: None  # resets are the point
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def set(self, fail_first: float, **changes) -> None:
        """Fail the next `fail_first` matching requests (counting restarts)."""
        with self._lock:
            self.fail_first, self.failed = fail_first, 0
            for k, v in changes.items():
                setattr(self, k, v)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FlakyProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _should_fail(self, method: str, path: str) -> bool:
        with self._lock:
            if self.failed < self.fail_first and self.match(method, path):
                self.failed += 1
                return True
            return False

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and "100 Continue" for botocore's Expect header

            def log_message(self, format, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                method = self.command
                if proxy._should_fail(method, self.path):
                    if proxy.reset:
                        proxy.requests.append((method, self.path, "reset"))
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.connection.close()
                        self.close_connection = True
                        return
                    proxy.requests.append((method, self.path, proxy.status))
                    payload = _SLOWDOWN.format(code=proxy.code).encode()
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if method == "HEAD" else len(payload)))
                    self.end_headers()
                    if method != "HEAD":
                        self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.target, timeout=60)
                try:
                    conn.request(method, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    proxy.requests.append((method, self.path, resp.status))
                    self.send_response_only(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_BY_HOP and not (k.lower() == "content-length" and method != "HEAD"):
                            self.send_header(k, v)
                    if method != "HEAD":
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if method != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler


__all__ = ["FlakyProxy", "S3Server", "clear_fs_caches", "running_s3_server"]
