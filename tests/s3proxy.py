"""Test helper for the fault-injection suite: a loopback TCP proxy in front of the stack's S3
server that can delay, drop or fail requests, and stop/restart of one stack component.

    with LoopbackProxy(stack.config.s3_port) as proxy:
        env AWS_ENDPOINT_URL=proxy.endpoint   # clients talk to S3 through the proxy
        proxy.delay = 2.0                     # every request waits 2 s before it is forwarded
        proxy.drop = True                     # connections are accepted and closed at once (and live ones cut)
        proxy.fail_methods = {"PUT"}          # PUTs answered 507 InsufficientStorage ("volume full")
        proxy.spare = ("/locks/",)            # ... except those to these paths

Each forwarded request gets its own upstream connection (``Connection: close`` is added),
so a fault switched on applies to the very next request, not only to new keep-alive
connections. Loopback only; plain threads, no event loop shared with the code under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

S3_FULL = (b"HTTP/1.1 507 Insufficient Storage\r\nContent-Type: application/xml\r\nConnection: close\r\n"
           b"Content-Length: %d\r\n\r\n%s")
S3_FULL_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InsufficientStorage</Code>'
                b"<Message>volume full (fault injected)</Message></Error>")


def _read_head(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """Request head (up to and with the blank line) and whatever body bytes came with it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
        if len(buf) > 1 << 20:
            return None
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _with_close(head: bytes) -> bytes:
    lines = [ln for ln in head.split(b"\r\n") if ln and not ln.lower().startswith(b"connection:")]
    return b"\r\n".join(lines + [b"Connection: close", b"", b""])


class LoopbackProxy:
    """A TCP proxy on 127.0.0.1 (a free port) to ``127.0.0.1:target_port``; see the module docstring.

    Counters: ``requests`` (heads seen), ``failed`` (answered with the injected error),
    ``dropped`` (connections closed unanswered)."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.delay = 0.0
        self.drop = False
        self.fail_methods: set[str] = set()
        self.spare: tuple[str, ...] = ()   # request paths containing one of these are never failed
        self.requests = self.failed = self.dropped = 0
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind((host, 0))
        self._server.listen(128)
        self.port = self._server.getsockname()[1]
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="s3proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LoopbackProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closed.set()
        # close() alone does not wake a thread blocked in accept() (it sat out join's 5 s);
        # shutdown() of the listening socket does, on Linux.
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._server.close()
        self.cut()
        self._thread.join(5)

    def heal(self) -> None:
        self.delay, self.drop, self.fail_methods, self.spare = 0.0, False, set(), ()

    def cut(self) -> None:
        """Close every live connection (requests in flight see a reset)."""
        with self._lock:
            live, self._live = list(self._live), set()
        for s in live:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._live.update(socks)

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        upstream = None
        try:
            if self.drop:
                self.dropped += 1
                return
            got = _read_head(client)
            if got is None:
                return
            head, rest = got
            self.requests += 1
            method, target = (head.split(b" ", 2) + [b"", b""])[:2]
            target = target.decode(errors="replace")
            if method.decode(errors="replace") in self.fail_methods and not any(p in target for p in self.spare):
                self.failed += 1
                client.sendall(S3_FULL % (len(S3_FULL_BODY), S3_FULL_BODY))
                return
            if self.delay:
                time.sleep(self.delay)
            if self.drop:
                self.dropped += 1
                return
            upstream = socket.create_connection(self.target, timeout=30)
            self._track(upstream)
            upstream.sendall(_with_close(head) + rest)
            back = threading.Thread(target=self._pipe, args=(upstream, client), daemon=True)
            back.start()
            self._pipe(client, upstream)
            back.join(60)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.close()
            with self._lock:
                self._live.discard(client)
                if upstream is not None:
                    self._live.discard(upstream)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


# -- stack components ---------------------------------------------------------------------


def stop_component(data_dir: str, name: str, sig: int = signal.SIGKILL) -> dict:
    """Signal the process group of stack component ``name`` and wait until it is gone;
    returns its recorded entry (argv, log) for :func:`start_component`."""
    from zooaudit_infra.stack import STATE_FILE, _alive, _group_members

    state = json.loads(Path(data_dir, STATE_FILE).read_text())
    proc = state["processes"][name]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc["pid"], sig)
    deadline = time.monotonic() + 30
    while (_alive(proc) or _group_members(proc["pid"])) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc["pid"], os.WNOHANG)
        time.sleep(0.1)
    assert not _group_members(proc["pid"]), f"{name} did not stop"
    return proc


def start_component(stack, name: str, healthy, timeout: float = 120.0) -> None:
    """Start component ``name`` again with its recorded command line and the stack's
    environment (recorded in stack.json, so ``down`` stops the new process), and wait until
    ``healthy()`` is true."""
    from zooaudit_infra.stack import S3_SERVER_ENV, STATE_FILE, _spawn, prefect_server_env

    cfg = stack.config
    state = json.loads(Path(cfg.data_dir, STATE_FILE).read_text())
    env = stack.env if name in ("runner", "dask-workers") else S3_SERVER_ENV if name == "seaweedfs" else {}
    if name == "prefect-server":   # the environment `up` gave it: its UI must point at its own API
        env = prefect_server_env(cfg, stack.env)
    _spawn(cfg, name, state["processes"][name]["argv"], env, state)
    stack.processes[name] = state["processes"][name]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if healthy():
                return
        time.sleep(0.5)
    raise AssertionError(f"{name} not healthy {timeout:.0f}s after restart")
