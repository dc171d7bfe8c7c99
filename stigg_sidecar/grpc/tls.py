"""ServerTls: gRPC's TLS credentials from TLS_CERT_FILE / TLS_KEY_FILE (/ TLS_CLIENT_CA_FILE), rotated live.

Owns reading and checking the PEM files and the `grpc.dynamic_ssl_server_credentials` the server
listens with. grpc-core asks `_fetch` before every TLS handshake; it answers a new certificate
configuration once after `reload()` accepted one, else None (keep serving the current one), so a
rotated certificate reaches new connections while open connections keep theirs.

A pair is checked before grpc-core sees it (the key matches the chain's first certificate, every
file parses), so a half-written or mismatched rotation is one log line and the last good pair stays
served. Errors and log lines name the setting and the path, never any of a key's content.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from twisted.logger import Logger

from stigg_sidecar.lifecycle.files import UnreadableFile, read_bytes

log = Logger()


class TlsError(ValueError):
    """A TLS file is missing, unreadable or wrong. One line naming the setting; never key material."""


@dataclass(frozen=True)
class TlsFiles:
    cert_file: str
    key_file: str
    client_ca_file: str = ""

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)


@dataclass(frozen=True)
class TlsMaterial:
    """One checked set of PEM bytes, and what the log may say about it."""

    chain_pem: bytes = b""
    key_pem: bytes = b""
    client_ca_pem: bytes | None = None
    summary: str = ""
    not_after: datetime.datetime | None = None

    def __repr__(self) -> str:  # never the key, whatever prints this
        return f"TlsMaterial({self.summary})"


def _read(setting: str, path: str) -> bytes:
    try:
        return read_bytes(path)
    except UnreadableFile as e:
        raise TlsError(f"{setting}: {e}") from None


def _certificates(setting: str, path: str, pem: bytes) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise TlsError(f"{setting}: {path} holds no valid PEM certificate") from None
    return certificates


def _public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _describe(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = names[0].value if names else ""
    if isinstance(common_name, bytes):
        common_name = common_name.decode("utf-8", "replace")
    subject = f"CN={common_name}" if names else certificate.subject.rfc4514_string() or "(no subject)"
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        alt = [str(n) for n in san.get_values_for_type(x509.DNSName)][:2] + [
            str(n) for n in san.get_values_for_type(x509.IPAddress)][:2]
    except x509.ExtensionNotFound:
        alt = []
    expires = certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{subject}" + (f" ({', '.join(alt)})" if alt else "") + f", serial {certificate.serial_number:x}, expires {expires}"


def load_material(files: TlsFiles) -> TlsMaterial:
    """Read and check the files: a certificate chain, the private key of its first certificate,
    and the client CA certificates when set. Raises TlsError naming the setting at fault."""
    chain_pem = _read("TLS_CERT_FILE", files.cert_file)
    key_pem = _read("TLS_KEY_FILE", files.key_file)
    chain = _certificates("TLS_CERT_FILE", files.cert_file, chain_pem)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TlsError(f"TLS_KEY_FILE: {files.key_file} is encrypted; give the key without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsError(f"TLS_KEY_FILE: {files.key_file} holds no valid PEM private key") from None
    if _public_der(chain[0].public_key()) != _public_der(key.public_key()):
        raise TlsError(
            f"TLS_KEY_FILE: {files.key_file} is not the key of the certificate in TLS_CERT_FILE ({files.cert_file})"
        )
    client_ca_pem = None
    if files.client_ca_file:
        client_ca_pem = _read("TLS_CLIENT_CA_FILE", files.client_ca_file)
        _certificates("TLS_CLIENT_CA_FILE", files.client_ca_file, client_ca_pem)
    return TlsMaterial(chain_pem, key_pem, client_ca_pem, _describe(chain[0]), chain[0].not_valid_after_utc)


def _configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key_pem, material.chain_pem)], root_certificates=material.client_ca_pem
    )


class ServerTls:
    """The server's TLS credentials; `reload()` (on the reactor) takes a rotated pair when it checks out.

    Construction reads and checks the files (TlsError on a bad pair: start-up stops with one line).
    """

    def __init__(self, files: TlsFiles, now: datetime.datetime | None = None) -> None:
        self._files = files
        self._current = load_material(files)
        # (version, configuration) replaced whole by reload(); handshake threads read it lock-free.
        self._latest: tuple[int, grpc.ServerCertificateConfiguration] = (0, _configuration(self._current))
        self._served_version = 0
        self.reloads = 0
        self.rejected = 0
        log.info(
            "TLS on: gRPC served over TLS only{mutual}; certificate {summary}",
            mutual=", client certificates required (TLS_CLIENT_CA_FILE)" if files.client_ca_file else "",
            summary=self._current.summary,
        )
        self._warn_if_expired(now)

    @property
    def summary(self) -> str:
        """The certificate served to new connections, as the log describes it."""
        return self._current.summary

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._latest[1],
            self._fetch,  # type: ignore[arg-type]  # grpcio's stubs leave out the None it documents
            require_client_authentication=bool(self._files.client_ca_file),
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # grpc-core's thread, before each handshake: a new configuration once, then None.
        version, configuration = self._latest
        if version == self._served_version:
            return None
        self._served_version = version
        return configuration

    def reload(self) -> bool:
        """Re-read the files; True when a new pair will be served to new connections. A bad pair is
        logged (once per change of the files: the watcher calls this only then) and ignored."""
        try:
            material = load_material(self._files)
        except TlsError as e:
            self.rejected += 1
            log.error("{error}; still serving the last good certificate ({summary})", error=str(e),
                      summary=self._current.summary)
            return False
        if material == self._current:
            return False
        self._current = material
        self._latest = (self._latest[0] + 1, _configuration(material))
        self.reloads += 1
        log.info("TLS certificate reloaded: new connections get {summary}", summary=material.summary)
        self._warn_if_expired(None)
        return True

    def _warn_if_expired(self, now: datetime.datetime | None) -> None:
        now = now or datetime.datetime.now(datetime.UTC)
        if self._current.not_after is not None and self._current.not_after < now:
            log.warn("TLS_CERT_FILE: the certificate expired at {at}; clients will refuse it",
                     at=self._current.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"))
