"""Test fixture: a real `redis-server` on a free loopback port, in a temporary directory.

`RedisServer(...).start()` writes a config file (no persistence, 127.0.0.1 only, optional
`requirepass` and ACL users), starts the binary from PATH and waits (bounded) until it answers.
`stop()` sends SIGTERM, `kill9()` SIGKILL, `restart()` starts it again on the same port.
`command(...)` is a tiny blocking RESP client for inspecting keys from a test.

When `redis-server` is not on PATH, `find_redis_server()` skips the test, except when the CI
environment variable is set: there a missing binary fails the test instead of hiding it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import SkipTest


def find_redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is not None:
        return binary
    if os.environ.get("CI"):
        raise AssertionError("redis-server is not on PATH, and CI is set: install redis-server")
    raise SkipTest("redis-server is not on PATH (install it to run the Redis tests)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisError(Exception):
    """An error reply from `RedisServer.command`."""


class RedisServer:
    def __init__(
        self,
        password: str | None = None,
        users: dict[str, str] | None = None,
        extra_config: tuple[str, ...] = (),
        port: int | None = None,
        tls: bool = False,
    ) -> None:
        """`password` sets `requirepass` (the default user); `users` adds ACL users
        (name -> password) allowed every key, channel and command. With `tls`, the port speaks
        TLS only, with a self-signed certificate for localhost/127.0.0.1 (`certificate_pem`)."""
        self.binary = find_redis_server()
        self.password = password
        self.users = dict(users or {})
        self.extra_config = extra_config
        self.port = port or free_port()
        # A port picked here can be taken by another test process before redis-server binds it;
        # then the first start moves to another free port (a restart keeps its port).
        self._may_move = port is None
        self._dir = tempfile.TemporaryDirectory(prefix="redis-test-")
        self.dir = Path(self._dir.name)
        self.process: subprocess.Popen | None = None
        self.tls = tls
        self.certificate_pem = _self_signed(self.dir) if tls else b""

    # -- life cycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 10) -> RedisServer:
        attempts = 3 if self._may_move else 1
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                self.port = free_port()
            else:
                self._may_move = False
                return self
        return self

    def _start_once(self, timeout: float) -> None:
        config = self.dir / "redis.conf"
        if self.tls:
            ports = [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.dir / 'cert.pem'}",
                f"tls-key-file {self.dir / 'key.pem'}",
                f"tls-ca-cert-file {self.dir / 'cert.pem'}",
                "tls-auth-clients no",
            ]
        else:
            ports = [f"port {self.port}"]
        lines = [
            *ports,
            "bind 127.0.0.1",
            'save ""',
            "appendonly no",
            f"dir {self.dir}",
            f"logfile {self.dir / 'redis.log'}",
            "daemonize no",
        ]
        if self.password is not None:
            lines.append(f"requirepass {self.password}")
        for name, secret in self.users.items():
            lines.append(f"user {name} on >{secret} ~* &* +@all")
        lines.extend(self.extra_config)
        config.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen(
            [self.binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir
        )
        self._wait_until_answering(timeout)

    def _wait_until_answering(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with self._connect(0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64)[:1] in (b"+", b"-"):  # PONG, or NOAUTH: it answers either way
                        return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within {timeout}s: {self.log_tail()}")

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)
        self.process = None

    def kill9(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def restart(self, timeout: float = 10) -> RedisServer:
        """Stop (if running) and start again on the same port, with the same configuration."""
        self.stop()
        return self.start(timeout)

    def cleanup(self) -> None:
        self.stop()
        self._dir.cleanup()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.dir / "redis.log").read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- a blocking client for assertions ---------------------------------------------------------

    def _connect(self, timeout: float) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        if not self.tls:
            return sock
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context.wrap_socket(sock)

    def command(
        self, *args: Any, user: str | None = None, password: str | None = None, db: int = 0, timeout: float = 5
    ) -> Any:
        """Run one command on a fresh connection (authenticated with the server's default
        password unless `user`/`password` say otherwise, on database `db`); the decoded reply."""
        with self._connect(timeout) as s:
            reader = s.makefile("rb")
            secret = password if password is not None else self.password
            if secret is not None:
                s.sendall(_encode(("AUTH", user, secret) if user else ("AUTH", secret)))
                _read_reply(reader)
            if db:
                s.sendall(_encode(("SELECT", db)))
                _read_reply(reader)
            s.sendall(_encode(args))
            return _read_reply(reader)


def _self_signed(directory: Path) -> bytes:
    """A throwaway certificate for localhost and 127.0.0.1, written as cert.pem/key.pem."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    (directory / "cert.pem").write_bytes(pem)
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return pem


def _encode(args: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(reader: Any) -> Any:
    line = reader.readline()
    if not line:
        raise ConnectionError("redis-server closed the connection")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise RedisError(body.decode())
    if kind == b":":
        return int(body)
    if kind == b"$":
        length = int(body)
        if length < 0:
            return None
        data = reader.read(length + 2)[:-2]
        return data.decode()
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise ValueError(f"unexpected reply {line!r}")
