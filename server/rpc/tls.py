"""TLS and mutual TLS for the server's gRPC port, with certificates reloaded when their files change.

``--tls-cert`` and ``--tls-key`` (PEM files) turn TLS on; ``--tls-client-ca`` (PEM, one or more CA
certificates) also requires every client to present a certificate signed by one of them (mutual TLS).
The files are read at start-up and checked with Python's ``ssl`` module, so a missing file, a key that
does not belong to the certificate or an encrypted key stops the server with a message that names the
flag, instead of every handshake failing later.

Rotation: gRPC asks :meth:`ServerTLS.fetch` on every new connection; when any of the three files has
changed since the last load (modification time, size or inode: an atomic rename and a Kubernetes
secret update both change it) the new set is checked and served to new connections. A set that does
not check out (a half-written pair, or a certificate that has expired: OpenSSL loads one, and every
client then refuses the handshake) is logged and the previous one stays in use; connections already
open keep the certificate they were opened with.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import ssl
import threading

import grpc

log = logging.getLogger("losswire.server")

Fingerprint = tuple[tuple[int, int, int], ...]


class TLSConfigError(ValueError):
    """The TLS settings cannot work: the message names the flag and what is wrong."""


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    cert: str
    key: str
    client_ca: str | None = None

    def named(self) -> list[tuple[str, str]]:
        files = [("--tls-cert", self.cert), ("--tls-key", self.key)]
        return files + ([("--tls-client-ca", self.client_ca)] if self.client_ca else [])


def tls_files(cert: str | None, key: str | None, client_ca: str | None) -> TLSFiles | None:
    """The TLS settings as one value, or None for plaintext; a combination that cannot work raises."""
    if not (cert or key or client_ca):
        return None
    if not cert or not key:
        given, missing = ("--tls-cert", "--tls-key") if cert else ("--tls-key", "--tls-cert")
        if client_ca and not cert and not key:
            raise TLSConfigError("--tls-client-ca needs --tls-cert and --tls-key: the server's certificate and key")
        raise TLSConfigError(f"{given} needs {missing} too: TLS takes the server's certificate and its private key")
    return TLSFiles(cert, key, client_ca or None)


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise TLSConfigError(f"{flag} {path}: cannot read it ({error.strerror})") from None
    if b"-----BEGIN " not in data:
        raise TLSConfigError(f"{flag} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


def _no_password() -> str:
    # called by OpenSSL only for an encrypted key; without it OpenSSL would prompt on the terminal
    raise TLSConfigError("the key is encrypted; gRPC needs an unencrypted PEM key (protect the file instead)")


def _check(files: TLSFiles) -> None:
    """Parse the files as a TLS server would: the certificate chain, the key that matches it, the CAs."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert, files.key, password=_no_password)
    except TLSConfigError as error:
        raise TLSConfigError(f"--tls-key {files.key}: {error}") from None
    except ssl.SSLError as error:
        reason = "the key does not match the certificate" if "KEY_VALUES_MISMATCH" in str(error) else str(error)
        raise TLSConfigError(f"--tls-cert {files.cert} / --tls-key {files.key}: {reason}") from None
    if files.client_ca:
        try:
            context.load_verify_locations(cafile=files.client_ca)
        except ssl.SSLError as error:
            raise TLSConfigError(f"--tls-client-ca {files.client_ca}: no usable CA certificate ({error})") from None


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _der_items(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """The DER items (tag, start of contents, end of contents) between ``start`` and ``end``."""
    items = []
    while start < end:
        tag, length, start = data[start], data[start + 1], start + 2
        if length & 0x80:  # long form: the next (length & 0x7f) bytes hold the length
            count = length & 0x7F
            length, start = int.from_bytes(data[start : start + count], "big"), start + count
        items.append((tag, start, start + length))
        start += length
    return items


def expiry(pem: bytes) -> datetime.datetime | None:
    """When the first certificate of ``pem`` expires (its notAfter), None if it cannot be told; read
    from its DER encoding: Python's ssl module parses a certificate's dates only for a verified peer."""
    match = _PEM_CERTIFICATE.search(pem)
    if match is None:
        return None
    try:
        der = ssl.PEM_cert_to_DER_cert(match[0].decode("ascii"))
        (_, start, end), *_ = _der_items(der, 0, len(der))  # Certificate
        (_, start, end), *_ = _der_items(der, start, end)  # tbsCertificate
        fields = _der_items(der, start, end)
        fields = fields[1:] if fields[0][0] == 0xA0 else fields  # the explicit [0] version
        _, start, end = fields[3]  # serialNumber, signature, issuer, validity
        tag, start, end = _der_items(der, start, end)[1]  # notBefore, notAfter
        text = der[start:end].decode("ascii")
        layout = "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ"  # UTCTime, GeneralizedTime
        return datetime.datetime.strptime(text, layout).replace(tzinfo=datetime.timezone.utc)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def _fingerprint(files: TLSFiles) -> Fingerprint:
    """What changes when a file is rewritten or replaced (stat follows the symlinks Kubernetes swaps)."""
    stats = [os.stat(path) for _, path in files.named()]
    return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)


def _certificate_configuration(files: TLSFiles, current: bool = False) -> grpc.ServerCertificateConfiguration:
    """Read and check the files (raises TLSConfigError naming the flag); ``current``: refuse a certificate
    that has expired too (one not yet valid is taken: its time comes, and clocks differ by seconds)."""
    pem = {flag: _read(flag, path) for flag, path in files.named()}
    _check(files)
    expires = expiry(pem["--tls-cert"])
    if expires is not None and expires <= datetime.datetime.now(datetime.timezone.utc):
        problem = f"--tls-cert {files.cert}: the certificate expired at {expires:%Y-%m-%d %H:%M:%S} UTC"
        if current:
            raise TLSConfigError(problem)
        log.warning("%s: clients will refuse it until it is replaced (new connections get the new one)", problem)
    return grpc.ssl_server_certificate_configuration(
        [(pem["--tls-key"], pem["--tls-cert"])], root_certificates=pem.get("--tls-client-ca")
    )


class ServerTLS:
    """The server's TLS credentials; new connections get the files' current certificates."""

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self.mutual = files.client_ca is not None
        self._lock = threading.Lock()
        self._loaded = _fingerprint_or_none(files)
        self._initial = _certificate_configuration(files)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._initial, self.fetch, require_client_authentication=self.mutual)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate fetcher (every new connection): a new configuration if the files changed."""
        with self._lock:
            current = _fingerprint_or_none(self.files)
            if current is None or current == self._loaded:
                return None
            self._loaded = current  # a bad set is reported once, not on every connection
            try:
                configuration = _certificate_configuration(self.files, current=True)
            except TLSConfigError as error:
                log.warning("TLS files changed but cannot be used, keeping the previous certificate: %s", error)
                return None
            log.info("TLS certificate reloaded from %s", ", ".join(path for _, path in self.files.named()))
            return configuration

    def describe(self) -> str:
        return "mutual TLS (client certificates required)" if self.mutual else "TLS"


def _fingerprint_or_none(files: TLSFiles) -> Fingerprint | None:
    try:
        return _fingerprint(files)
    except OSError:
        return None  # mid-rotation (a file briefly missing): keep serving the loaded certificate
