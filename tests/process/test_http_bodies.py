"""The HTTP port (health, readiness, metrics) takes no request body: a body is refused at once,
before a byte of it is read, and never reaches a temporary file (issue 20, finding 4).

A real sidecar process (offline) and raw sockets on 127.0.0.1: a client declaring a huge body and
trickling it must get its answer at once, and the process must hold no temporary file for it.
"""

from __future__ import annotations

import os
import socket
import time

from twisted.trial.unittest import TestCase

from tests.fixtures.processes import SidecarProcess, base_env


def _response_head(sock: socket.socket, timeout: float) -> bytes:
    """The bytes the server sends within `timeout` seconds, up to the end of its headers."""
    sock.settimeout(timeout)
    received = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in received and time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            break
        if not chunk:
            break
        received += chunk
    return received


def _temp_files(pid: int) -> list[str]:
    """Unlinked files the process holds open (tempfile.TemporaryFile's, on Linux)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.endswith("(deleted)"):
            found.append(target)
    return found


class HttpBodyTests(TestCase):
    timeout = 60

    def setUp(self):
        self.sidecar = SidecarProcess(base_env(OFFLINE="1"))
        self.addCleanup(self.sidecar.kill)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.sidecar.http_port), timeout=5)
        self.addCleanup(sock.close)
        return sock

    def test_a_post_with_a_huge_body_is_refused_before_the_body_is_read(self):
        sock = self.connect()
        sock.sendall(b"POST /livez HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n\r\n" + b"x" * 1000)
        head = _response_head(sock, 3)
        self.assertTrue(head.startswith(b"HTTP/1.1 405 "), head)
        self.assertEqual(_temp_files(self.sidecar.process.pid), [])
        try:
            sock.sendall(b"x" * 100_000)  # what still trickles in is dropped, not parsed
        except OSError:
            pass  # or the server has closed already
        self.assertEqual(self.sidecar.stop(), 0)
        self.assertNotIn("Traceback", self.sidecar.text)

    def test_a_get_with_a_body_is_refused_at_once(self):
        sock = self.connect()
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\nab")
        head = _response_head(sock, 3)
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)

    def test_a_chunked_body_never_reaches_a_temporary_file(self):
        sock = self.connect()
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n")
        head = _response_head(sock, 3)
        self.assertEqual(_temp_files(self.sidecar.process.pid), [])
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)

    def test_probes_without_a_body_still_answer_and_the_connection_stays_usable(self):
        sock = self.connect()
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        head = _response_head(sock, 5)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        rest = sock.recv(4096) if b'"UP"' not in head else b""
        self.assertIn(b'"UP"', head + rest)
        sock.sendall(b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(_response_head(sock, 5).startswith(b"HTTP/1.1 200 "))
