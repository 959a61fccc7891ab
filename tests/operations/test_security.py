"""Security: TLS, mutual TLS, bearer tokens, and requests that can never import or run code.

Every certificate is made here with ``cryptography``: a CA, a server certificate for localhost /
127.0.0.1 / ::1, a client certificate from the same CA, and a foreign CA with its own server and
client certificates. Servers run for real on ephemeral loopback ports (in this process, and one
``losswire serve`` subprocess configured only by flags and a token file, called by a client configured
only by environment variables).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import ipaddress
import logging
import os
import queue
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from support.oip import infer_request, outputs_of
from support.servers import ServerProcess, losswire_script, serve_cmd, server_env

from losswire.client import LossClient, RemoteLoss, RemoteLossError
from losswire.client.channels import make_channel
from losswire.client.security import Credentials
from losswire.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from losswire.server.app import LosswireServer
from losswire.server.cli import KnobError, build_parser, resolve_settings
from losswire.server.config import ServerConfig
from losswire.server.losses import build_loss
from losswire.server.rpc.grpc_logs import GRPC_LOGGER, CallerLines
from losswire.v1 import loss_service_pb2 as pb
from losswire.v1 import loss_service_pb2_grpc as pb_grpc
from losswire.wire import codec

pytestmark = pytest.mark.slow  # server subprocesses

CALL_TIMEOUT = 30.0
REFUSED_TIMEOUT = 10.0  # a refused handshake fails at once; the deadline only bounds a hang
FOCAL = dict(type="FocalLoss", gamma=2.0, alpha=0.25)


# -- certificates ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: Path  # the CA the server and the good client come from
    server: Issued  # for localhost, 127.0.0.1, ::1
    client: Issued  # clientAuth, from ca
    foreign_ca: Path
    foreign_server: Issued  # the same names, from foreign_ca
    foreign_client: Issued  # clientAuth, from foreign_ca
    mismatched_key: Path  # a key of no certificate here


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _builder(subject: str, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], name: str, server: bool
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key, ca_cert = ca
    key = _key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = _builder(name, ca_cert.subject, key.public_key()).add_extension(
        x509.ExtendedKeyUsage([usage]), critical=False
    )
    if server:
        names = [x509.DNSName("localhost"), *(x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    path.chmod(0o600)
    return path


def _write_pair(directory: Path, name: str, pair: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> Issued:
    key, cert = pair
    return Issued(_write_cert(directory / f"{name}.pem", cert), _write_key(directory / f"{name}.key", key))


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca, foreign = _make_ca("losswire test CA"), _make_ca("foreign CA")
    return Pki(
        ca=_write_cert(directory / "ca.pem", ca[1]),
        server=_write_pair(directory, "server", _issue(ca, "losswire server", server=True)),
        client=_write_pair(directory, "client", _issue(ca, "trainer", server=False)),
        foreign_ca=_write_cert(directory / "foreign-ca.pem", foreign[1]),
        foreign_server=_write_pair(directory, "foreign-server", _issue(foreign, "impostor", server=True)),
        foreign_client=_write_pair(directory, "foreign-client", _issue(foreign, "intruder", server=False)),
        mismatched_key=_write_key(directory / "stray.key", _key()),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token() -> str:
    return secrets.token_hex(32)


# -- servers -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def running() -> Iterator:
    """``running(**config)`` starts an in-process server on 127.0.0.1; all are stopped at module end."""
    servers: list[LosswireServer] = []

    def start(**config: Any) -> LosswireServer:
        server = LosswireServer(ServerConfig(host="127.0.0.1", port=0, device="cpu", max_workers=4, **config))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0)


def address(server: LosswireServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def tls_server(running, pki: Pki) -> LosswireServer:
    return running(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key))


@pytest.fixture(scope="module")
def mtls_server(running, pki: Pki) -> LosswireServer:
    return running(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key), tls_client_ca=str(pki.ca))


@pytest.fixture(scope="module")
def token_server(running, token: str) -> LosswireServer:
    """Plaintext on loopback with a token: the client sends it under gRPC's local credentials."""
    return running(auth_tokens=(token,))


def focal_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, generator=g), torch.randint(0, 6, (6,), generator=g)


def assert_remote_equals_engine(client: LossClient) -> None:
    """A forward and backward through ``client`` equal the in-process engine's."""
    pred, labels = focal_inputs()
    remote_pred, local_pred = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    remote = RemoteLoss(FOCAL, client=client)(remote_pred, labels, avg_factor=3.0)
    remote.backward()
    local = build_loss(FOCAL)(local_pred, labels, avg_factor=3.0)
    local.backward()
    torch.testing.assert_close(remote.detach(), local.detach())
    torch.testing.assert_close(remote_pred.grad, local_pred.grad)


def refused(client: LossClient) -> RemoteLossError:
    with pytest.raises(RemoteLossError) as caught:
        client.describe(FOCAL, timeout=REFUSED_TIMEOUT)
    return caught.value


# -- TLS and mutual TLS --------------------------------------------------------------------------------


def test_a_tls_call_equals_the_engine(tls_server: LosswireServer, pki: Pki):
    client = LossClient(address(tls_server), credentials=Credentials.from_files(ca=pki.ca))
    assert_remote_equals_engine(client)
    client.close()


def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_server: LosswireServer):
    client = LossClient(address(tls_server), credentials=Credentials())
    assert refused(client).code == grpc.StatusCode.UNAVAILABLE
    client.close()


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param(lambda pki: Credentials.from_files(ca=pki.foreign_ca), id="server-cert-from-an-untrusted-ca"),
        pytest.param(lambda pki: Credentials.from_files(ca=pki.ca, server_name="other.example"), id="wrong-name"),
    ],
)
def test_the_client_refuses_a_server_it_cannot_verify(tls_server: LosswireServer, pki: Pki, credentials):
    client = LossClient(address(tls_server), credentials=credentials(pki))
    error = refused(client)
    assert error.code == grpc.StatusCode.UNAVAILABLE, error
    client.close()


def test_an_impostor_server_is_refused(running, pki: Pki):
    """A server with a certificate from another CA, for the very same names."""
    impostor = running(tls_cert=str(pki.foreign_server.cert), tls_key=str(pki.foreign_server.key))
    client = LossClient(address(impostor), credentials=Credentials.from_files(ca=pki.ca))
    assert refused(client).code == grpc.StatusCode.UNAVAILABLE
    client.close()


@pytest.mark.parametrize(
    "identity",
    [
        pytest.param(None, id="no-client-certificate"),
        pytest.param("foreign_client", id="client-certificate-from-a-foreign-ca"),
    ],
)
def test_mutual_tls_refuses_clients_without_a_certificate_from_its_ca(mtls_server, pki: Pki, identity):
    issued = getattr(pki, identity) if identity else None
    credentials = Credentials.from_files(
        ca=pki.ca, cert=issued.cert if issued else None, key=issued.key if issued else None
    )
    client = LossClient(address(mtls_server), credentials=credentials)
    assert refused(client).code == grpc.StatusCode.UNAVAILABLE
    client.close()


def test_mutual_tls_serves_a_client_with_a_certificate_from_its_ca(mtls_server, pki: Pki):
    credentials = Credentials.from_files(ca=pki.ca, cert=pki.client.cert, key=pki.client.key)
    client = LossClient(address(mtls_server), credentials=credentials)
    assert_remote_equals_engine(client)
    client.close()


def test_certificates_are_reloaded_when_their_files_change(running, pki: Pki, tmp_path: Path):
    """New connections get the rotated certificate; a half-written pair keeps the previous one."""
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    server = running(tls_cert=str(cert), tls_key=str(key))
    trusts_old, trusts_new = Credentials.from_files(ca=pki.ca), Credentials.from_files(ca=pki.foreign_ca)
    first = LossClient(address(server), credentials=trusts_old)
    first.describe(FOCAL, timeout=CALL_TIMEOUT)

    # rotate to the foreign CA's certificate (atomic replaces, as a secret update does)
    _replace(key, pki.foreign_server.key.read_bytes())
    _replace(cert, pki.foreign_server.cert.read_bytes())
    rotated = LossClient(address(server), credentials=trusts_new)
    rotated.describe(FOCAL, timeout=CALL_TIMEOUT)
    assert refused(LossClient(address(server), credentials=trusts_old)).code == grpc.StatusCode.UNAVAILABLE
    first.describe(FOCAL, timeout=CALL_TIMEOUT)  # an open connection keeps the certificate it was opened with

    # a key that does not match: the server keeps serving the certificate it has
    _replace(key, pki.mismatched_key.read_bytes())
    LossClient(address(server), credentials=trusts_new).describe(FOCAL, timeout=CALL_TIMEOUT)


def test_an_expired_certificate_is_not_rotated_in(running, tmp_path: Path, caplog):
    """OpenSSL loads an expired certificate, and every client then refuses the handshake: a rotation to
    one keeps the previous certificate, and says so."""
    ca = _make_ca("rotation CA")
    ca_file = _write_cert(tmp_path / "ca.pem", ca[1])
    current = _write_pair(tmp_path, "server", _issue(ca, "losswire server", server=True))
    key, cert = _issue(ca, "losswire server", server=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = (
        x509.CertificateBuilder(
            cert.issuer, cert.subject, key.public_key(), cert.serial_number, extensions=list(cert.extensions)
        )
        .not_valid_before(now - datetime.timedelta(days=3))
        .not_valid_after(now - datetime.timedelta(days=1))
        .sign(ca[0], hashes.SHA256())
    )
    server = running(tls_cert=str(current.cert), tls_key=str(current.key))
    trusts_ca = Credentials.from_files(ca=ca_file)
    with caplog.at_level(logging.WARNING, logger="losswire.server"):
        _replace(current.key, _write_key(tmp_path / "expired.key", key).read_bytes())
        _replace(current.cert, expired.public_bytes(serialization.Encoding.PEM))
        LossClient(address(server), credentials=trusts_ca).describe(FOCAL, timeout=CALL_TIMEOUT)
    expired_at = expired.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S")
    assert f"keeping the previous certificate: --tls-cert {current.cert}: the certificate expired at {expired_at}" in (
        caplog.text
    )


def _replace(path: Path, data: bytes) -> None:
    staged = path.with_suffix(path.suffix + ".new")
    staged.write_bytes(data)
    os.replace(staged, path)


# -- bearer tokens ---------------------------------------------------------------------------------


def test_a_call_without_a_token_is_unauthenticated(token_server: LosswireServer):
    error = refused(LossClient(address(token_server), credentials=Credentials()))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "requires a token" in error.details and "authorization: Bearer" in error.details


def test_a_wrong_token_is_unauthenticated_and_never_echoed(token_server: LosswireServer, token: str):
    wrong = secrets.token_hex(32)
    error = refused(LossClient(address(token_server), credentials=Credentials(token=wrong)))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.details == "invalid token"
    near_miss = token[:-1] + ("0" if token[-1] != "0" else "1")
    assert refused(LossClient(address(token_server), credentials=Credentials(token=near_miss))).code == (
        grpc.StatusCode.UNAUTHENTICATED
    )


@pytest.mark.parametrize(
    "metadata, reason",
    [
        ([("authorization", "Basic dXNlcjpwYXNz")], "not of the form 'Bearer <token>'"),
        ([("authorization", "Bearer")], "not of the form 'Bearer <token>'"),
        ([("authorization", "Bearer a"), ("authorization", "Bearer b")], "several 'authorization'"),
    ],
)
def test_a_malformed_authorization_header_says_what_is_wrong(token_server, metadata, reason):
    with grpc.insecure_channel(address(token_server)) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.LossServiceStub(channel).ListLosses(pb.ListLossesRequest(), metadata=metadata, timeout=CALL_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason in caught.value.details()


def raw_health_call(port: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A health Check sent over HTTP/2 by hand, with header values gRPC's own client refuses to send
    (bytes that are not UTF-8); what the server answers, until it closes or 5 s pass."""

    def length(value: int) -> bytes:  # an HPACK integer with a 7-bit prefix
        if value < 127:
            return bytes([value])
        encoded, value = [127], value - 127
        while value >= 128:
            encoded.append((value & 127) | 128)
            value >>= 7
        return bytes([*encoded, value])

    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

    fields = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/grpc.health.v1.Health/Check"),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *headers,
    ]
    block = b"".join(b"\x00" + length(len(name)) + name + length(len(value)) + value for name, value in fields)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b""))
        sock.sendall(frame(1, 0x4, 1, block) + frame(0, 0x1, 1, bytes(5)))  # an empty request message
        answer, deadline = b"", time.monotonic() + 5
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while time.monotonic() < deadline and b"grpc-status" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
    return answer


def test_metadata_that_is_not_utf8_never_puts_a_token_in_the_log(token_server, token: str, caplog):
    """gRPC logs a metadata value it cannot decode as UTF-8 with the raw bytes and a traceback, before
    any interceptor runs: an authorization header of a valid token and one stray byte wrote the token
    into the server's log, and junk headers wrote ~60 KB of log per call. The line now says what
    happened, without the bytes, at most once in a while."""
    caplog.set_level(logging.WARNING)
    answer = raw_health_call(token_server.port, [(b"authorization", b"Bearer " + token.encode() + b"\xff")])
    for _ in range(20):
        raw_health_call(token_server.port, [(b"x-junk", b"\xff" * 4000)])
    assert b"grpc-status" in answer, "the server never answered the call"
    assert token not in caplog.text
    lines = [r for r in caplog.records if r.name == "grpc._cython.cygrpc"]
    assert 1 <= len(lines) <= 2 and all(r.exc_info is None for r in lines)
    assert "not UTF-8" in lines[0].getMessage() and len(caplog.text) < 20_000


def test_grpc_lines_about_callers_going_away_say_so_once_in_a_while():
    """grpcio logs at ERROR, with a traceback, every answer it could not send because its caller had gone:
    a caller cancelling its calls mid-answer wrote a traceback per call. The line is rewritten (no
    traceback) and written at most once per interval, then with how many were left out."""
    now = [0.0]
    lines = CallerLines(interval=10.0, clock=lambda: now[0])

    def record() -> logging.LogRecord:
        try:
            raise RuntimeError("Failed execute_batch")
        except RuntimeError:
            info = sys.exc_info()
        message = "ExecuteBatchError raised in core by servicer method [%s]"
        args = ("/losswire.v1.LossService/EvaluateStream",)
        return logging.LogRecord(GRPC_LOGGER, logging.ERROR, "server.pyx", 1, message, args, info)

    first = record()
    assert lines.filter(first) in (True, False) and first.exc_info is None and first.levelno == logging.INFO
    assert "caller went away" in first.getMessage()
    assert not any(lines.filter(record()) for _ in range(5))  # within the interval: left out
    now[0] = 11.0
    later = record()
    lines.filter(later)
    assert "5 more such lines left out" in later.getMessage()


def test_the_right_token_is_served_and_counted(token_server: LosswireServer, token: str):
    def unauthenticated() -> float:
        labels = {"method": "Describe", "code": "UNAUTHENTICATED"}
        return token_server.metrics.registry.get_sample_value("losswire_requests_total", labels) or 0.0

    assert_remote_equals_engine(LossClient(address(token_server), credentials=Credentials(token=token)))
    before = unauthenticated()
    refused(LossClient(address(token_server), credentials=Credentials()))
    assert unauthenticated() == before + 1  # the metrics interceptor sees refused calls too


def test_health_stays_open_without_a_token(token_server: LosswireServer):
    with grpc.insecure_channel(address(token_server)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "losswire.v1.LossService"):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_needs_the_token(token_server: LosswireServer, token: str):
    with grpc.insecure_channel(address(token_server)) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with make_channel(address(token_server), credentials=Credentials(token=token)) as channel:
        assert "losswire.v1.LossService" in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_the_inference_protocol_needs_the_token(token_server: LosswireServer, token: str):
    pred, labels = focal_inputs()
    request = infer_request("FocalLoss", {"pred": pred, "target": labels}, config={"gamma": 2.0, "alpha": 0.25})
    with grpc.insecure_channel(address(token_server)) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for call, message in ((stub.ModelInfer, request), (stub.ServerLive, None)):
            with pytest.raises(grpc.RpcError) as caught:
                call(message or _server_live(), timeout=CALL_TIMEOUT)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = stub.ModelInfer(request, metadata=[("authorization", f"Bearer {token}")], timeout=CALL_TIMEOUT)
    expected = build_loss(FOCAL)(pred, labels)
    torch.testing.assert_close(outputs_of(answer)["loss"], expected.detach())


def _server_live() -> Any:
    from losswire.inference import grpc_predict_v2_pb2 as oip

    return oip.ServerLiveRequest()


def test_token_file_changes_apply_without_a_restart(running, tmp_path: Path):
    old, new = secrets.token_hex(32), secrets.token_hex(32)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# trainers\n{old}\n\n")
    server = running(auth_tokens_file=str(tokens))

    def works(value: str) -> bool:
        try:
            LossClient(address(server), credentials=Credentials(token=value)).describe(FOCAL, timeout=CALL_TIMEOUT)
        except RemoteLossError as error:
            assert error.code == grpc.StatusCode.UNAUTHENTICATED
            return False
        return True

    assert works(old) and not works(new)
    _replace(tokens, f"{new}\n".encode())
    assert works(new) and not works(old)
    _replace(tokens, b"# emptied by mistake\n")  # keeps the previous tokens rather than lock everyone out
    assert works(new)


def test_a_removed_token_is_refused_at_once_and_what_it_started_stays_bounded(running, tmp_path: Path):
    """Its next call is UNAUTHENTICATED; a stream it opened before runs on; its sessions, which no other
    token can use, stay counted against --max-sessions until they idle out (security.md says so)."""
    gone, kept = secrets.token_hex(32), secrets.token_hex(32)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{gone}\n{kept}\n")
    server = running(auth_tokens_file=str(tokens), max_sessions=3, max_sessions_per_token=2)
    seesaw = dict(type="SeesawLoss", num_classes=4)

    def session_call(token: str, name: str) -> None:
        loss = RemoteLoss(
            seesaw, session=name, client=LossClient(address(server), credentials=Credentials(token=token))
        )
        loss(torch.randn(6, 6), torch.randint(0, 4, (6,)))

    session_call(gone, "a")
    session_call(gone, "b")
    requests: queue.Queue = queue.Queue()
    with grpc.insecure_channel(address(server)) as channel:
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter(requests.get, None), metadata=(("authorization", f"Bearer {gone}"),)
        )
        requests.put(ask)
        assert next(stream).list_services_response.service
        _replace(tokens, f"{kept}\n".encode())
        assert refused(LossClient(address(server), credentials=Credentials(token=gone))).code == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        requests.put(ask)  # the stream opened before the change is served on
        assert next(stream).list_services_response.service
        requests.put(None)
    assert len(server.sessions) == 2  # the removed token's, until they idle out
    session_call(kept, "c")
    with pytest.raises(RemoteLossError, match="--max-sessions"):
        session_call(kept, "d")


def test_a_named_pipe_swapped_in_for_the_token_file_freezes_nothing(running, tmp_path: Path, caplog):
    """Opening a named pipe waits for a writer; the file is re-read on the event loop, where that wait
    froze every call, health checks included. A re-read takes a regular file only."""
    token = secrets.token_hex(32)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token}\n")
    server = running(auth_tokens_file=str(tokens))
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    os.replace(pipe, tokens)
    try:
        with caplog.at_level(logging.WARNING, logger="losswire.server"):
            client = LossClient(address(server), credentials=Credentials(token=token))
            client.describe(FOCAL, timeout=REFUSED_TIMEOUT)
        assert f"keeping the previous tokens: --auth-tokens-file {tokens}: not a regular file" in caplog.text
    finally:  # a server waiting on the pipe (without the fix) is let go: a writer that writes nothing
        with contextlib.suppress(OSError):
            os.close(os.open(tokens, os.O_WRONLY | os.O_NONBLOCK))


def test_a_token_file_grown_past_its_bound_keeps_the_previous_tokens(running, tmp_path: Path, caplog):
    """Each call's token is compared, on the event loop, with every configured one: a file of 100 MB of
    tokens stalled every caller 2.1 s on its re-read and 0.24 s on every call after. A file over 1 MiB
    is refused, after reading no more than that, with a line that says so."""
    old, new = secrets.token_hex(32), secrets.token_hex(32)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{old}\n")
    server = running(auth_tokens_file=str(tokens))
    _replace(tokens, f"{new}\n".encode() * (1 + (1 << 20) // len(new)))  # valid lines, one too many bytes
    with caplog.at_level(logging.WARNING, logger="losswire.server"):
        LossClient(address(server), credentials=Credentials(token=old)).describe(FOCAL, timeout=CALL_TIMEOUT)
        assert refused(LossClient(address(server), credentials=Credentials(token=new))).code == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    assert f"keeping the previous tokens: --auth-tokens-file {tokens}: over 1048576 bytes" in caplog.text
    assert new not in caplog.text
    with pytest.raises(ValueError, match="over 1048576 bytes"):  # and at start-up: exit 2, naming the flag
        running(auth_tokens_file=str(tokens))
    _replace(tokens, f"{new}\n{new}\n".encode())  # a token listed twice is fine
    LossClient(address(server), credentials=Credentials(token=new)).describe(FOCAL, timeout=CALL_TIMEOUT)


def test_tokens_without_tls_start_with_a_warning(running, token: str, caplog):
    with caplog.at_level(logging.INFO, logger="losswire.server"):
        running(auth_tokens=(token,))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("plaintext" in message for message in warnings), caplog.text
    assert token not in caplog.text


# -- credentials reach every channel: a balanced list of replicas and its per-replica session channels -------


def test_credentials_apply_to_every_replica_and_session_channel(running, pki: Pki, token: str):
    secure = dict(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key), tls_client_ca=str(pki.ca))
    replicas = [running(**secure, auth_tokens=(token,)) for _ in range(2)]
    credentials = Credentials.from_files(ca=pki.ca, cert=pki.client.cert, key=pki.client.key, token=token)
    client = LossClient([address(r) for r in replicas], credentials=credentials, timeout=CALL_TIMEOUT)
    assert_remote_equals_engine(client)  # the balanced channel
    seesaw = RemoteLoss(dict(type="SeesawLoss", num_classes=4), client=client, session="secure/seesaw")
    scores, labels = torch.randn(6, 6, requires_grad=True), torch.randint(0, 5, (6,))
    sum(seesaw(scores, labels).values()).backward()  # the session's replica, over its own channel
    assert seesaw.session_state()["cum_samples"].sum() == 6
    assert [info.session for info in client.list_sessions().sessions] == ["secure/seesaw"]
    client.close()


def test_a_dns_target_pins_sessions_over_tls(mtls_server: LosswireServer, pki: Pki):
    """Per-replica channels dial resolved addresses but check the certificate against the DNS name."""
    credentials = Credentials.from_files(ca=pki.ca, cert=pki.client.cert, key=pki.client.key)
    client = LossClient(f"dns:///localhost:{mtls_server.port}", credentials=credentials, timeout=CALL_TIMEOUT)
    seesaw = RemoteLoss(dict(type="SeesawLoss", num_classes=4), client=client, session="secure/dns")
    scores, labels = torch.randn(5, 6, requires_grad=True), torch.randint(0, 5, (5,))
    sum(seesaw(scores, labels).values()).backward()
    assert client.replica_for("secure/dns") is not None
    assert seesaw.reset_session()["cum_samples"].sum() == 5
    client.close()


def test_a_copied_remote_loss_keeps_its_credentials(mtls_server: LosswireServer, pki: Pki):
    """mmengine deep-copies modules: a copy reconnects with the credentials it was given in code."""
    credentials = Credentials.from_files(ca=pki.ca, cert=pki.client.cert, key=pki.client.key)
    loss = RemoteLoss(FOCAL, client=LossClient(address(mtls_server), credentials=credentials))
    copied = copy.deepcopy(loss)
    assert copied.client.credentials == credentials
    pred, labels = focal_inputs(2)
    torch.testing.assert_close(copied(pred, labels), loss(pred, labels))


def test_tls_to_several_hosts_needs_one_name(pki: Pki):
    with pytest.raises(ValueError, match="server_name"):
        LossClient(["127.0.0.1:1", "127.0.0.2:1"], credentials=Credentials.from_files(ca=pki.ca))
    LossClient(["127.0.0.1:1", "127.0.0.2:1"], credentials=Credentials.from_files(ca=pki.ca, server_name="localhost"))


def test_a_token_never_travels_in_plaintext_off_this_machine(token: str):
    with pytest.raises(ValueError, match="only sent over TLS or to a loopback address"):
        LossClient("10.1.2.3:50051", credentials=Credentials(token=token))
    assert "token=<set>" in repr(Credentials(token=token)) and token not in repr(Credentials(token=token))


def test_client_credentials_come_from_the_environment(pki: Pki, token: str, tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text(f"# the trainer's token\n{token}\n")
    environ = {
        "LOSSWIRE_TLS_CA": str(pki.ca),
        "LOSSWIRE_TLS_CLIENT_CERT": str(pki.client.cert),
        "LOSSWIRE_TLS_CLIENT_KEY": str(pki.client.key),
        "LOSSWIRE_TOKEN_FILE": str(token_file),
    }
    expected = Credentials.from_files(ca=pki.ca, cert=pki.client.cert, key=pki.client.key, token=token)
    assert Credentials.from_env(environ) == expected
    assert Credentials.from_env({}) == Credentials()
    with pytest.raises(ValueError, match="LOSSWIRE_TLS_CLIENT_KEY"):
        Credentials.from_env({"LOSSWIRE_TLS_CLIENT_CERT": str(pki.client.cert)})


# -- start-up refuses settings that cannot work --------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        (lambda p: dict(tls_cert=p.server.cert), "--tls-cert needs --tls-key"),
        (lambda p: dict(tls_key=p.server.key), "--tls-key needs --tls-cert"),
        (lambda p: dict(tls_client_ca=p.ca), "--tls-client-ca needs --tls-cert and --tls-key"),
        (lambda p: dict(tls_cert=p.server.cert, tls_key=p.server.key.with_name("none.key")), "--tls-key"),
        (lambda p: dict(tls_cert=p.server.cert, tls_key=p.mismatched_key), "does not match the certificate"),
        (lambda p: dict(tls_cert=p.server.cert, tls_key=p.server.key, tls_client_ca=p.server.key), "--tls-client-ca"),
        (lambda p: dict(auth_tokens_file=str(p.ca.with_name("missing-tokens"))), "--auth-tokens-file"),
        (lambda p: dict(auth_tokens=("short",)), "16 to 4096 characters"),
    ],
)
def test_bad_security_settings_stop_the_server(pki: Pki, settings, message):
    config = {k: str(v) if isinstance(v, Path) else v for k, v in settings(pki).items()}
    with pytest.raises(ValueError, match=message):
        LosswireServer(ServerConfig(host="127.0.0.1", port=0, device="cpu", **config))


@pytest.mark.parametrize(
    "value, message",
    [("", "holds no token"), (" , ", "holds no token"), ("tooshort", "this one has 8")],
)
def test_the_token_variable_is_checked_and_never_echoed(value: str, message: str):
    with pytest.raises(KnobError, match=message) as caught:
        resolve_settings(build_parser().parse_args(["serve"]), {"LOSSWIRE_AUTH_TOKENS": value})
    assert "tooshort" not in str(caught.value)


def test_a_half_configured_tls_server_exits_2_naming_the_flag(pki: Pki):
    process = ServerProcess(
        serve_cmd("--host", "127.0.0.1", "--port", "0", "--tls-cert", str(pki.server.cert)), server_env()
    )
    try:
        assert process.wait_exit() == 2
        assert "--tls-cert needs --tls-key" in process.log()
    finally:
        process.close()


# -- the deployed server: flags, a token file, a client configured by its environment -----------------------


@pytest.fixture(scope="module")
def secure_process(pki: Pki, token: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"# losswire bearer tokens\n{token}\n")
    argv = serve_cmd("--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--log-level", "debug")
    argv += ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tls-client-ca", str(pki.ca)]
    argv += ["--auth-tokens-file", str(tokens), "--health-port", "0"]
    process = ServerProcess(argv, server_env())
    try:
        yield process.wait_started()
    finally:
        process.close()


def test_a_secured_server_from_the_command_line_works_end_to_end(
    secure_process: ServerProcess, pki: Pki, token: str, tmp_path: Path, monkeypatch
):
    assert "security: mutual TLS (client certificates required), bearer tokens required (1 configured)" in (
        secure_process.log()
    )
    token_file = tmp_path / "token"
    token_file.write_text(token)
    # a training script changes nothing: RemoteLoss finds the credentials in its environment
    monkeypatch.setenv("LOSSWIRE_TLS_CA", str(pki.ca))
    monkeypatch.setenv("LOSSWIRE_TLS_CLIENT_CERT", str(pki.client.cert))
    monkeypatch.setenv("LOSSWIRE_TLS_CLIENT_KEY", str(pki.client.key))
    monkeypatch.setenv("LOSSWIRE_TOKEN_FILE", str(token_file))
    assert_remote_equals_engine(LossClient.shared(secure_process.target))
    pred, labels = focal_inputs(1)
    pred.requires_grad_()
    RemoteLoss(FOCAL, secure_process.target)(pred, labels).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0

    # the certificate alone is not enough, and a wrong token is refused; neither token reaches the log
    no_token = Credentials.from_files(ca=pki.ca, cert=pki.client.cert, key=pki.client.key)
    assert refused(LossClient(secure_process.target, credentials=no_token)).code == grpc.StatusCode.UNAUTHENTICATED
    wrong = secrets.token_hex(32)
    wrong_token = dataclasses.replace(no_token, token=wrong)
    assert refused(LossClient(secure_process.target, credentials=wrong_token)).code == grpc.StatusCode.UNAUTHENTICATED
    secure_process.wait_for("refused /losswire.v1.LossService/Describe .*: invalid token")
    log = secure_process.log()
    assert token not in log and wrong not in log


def test_losswire_health_asks_the_plaintext_health_port(secure_process: ServerProcess, pki: Pki):
    health_port = secure_process.wait_for(r"health \(grpc.health.v1 only, plaintext\) on \S+:(\d+)")[1]
    common = ["--host", "127.0.0.1", "--port", str(secure_process.port), "--tls-cert", str(pki.server.cert)]
    env = server_env()
    probe = subprocess.run(
        [losswire_script(), "health", *common, "--health-port", health_port],
        env=env,
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT,
    )
    assert probe.returncode == 0, probe.stderr
    assert "SERVING" in probe.stdout
    without = subprocess.run(
        [losswire_script(), "health", *common], env=env, capture_output=True, text=True, timeout=CALL_TIMEOUT
    )
    assert without.returncode == 2 and "--health-port" in without.stderr
    # the health-only port serves nothing else
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.LossServiceStub(channel).ListLosses(pb.ListLossesRequest(), timeout=CALL_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


# -- nothing in a request imports or runs code --------------------------------------------------------------

HOSTILE_CONFIGS = [
    {"type": "os.system"},
    {"type": "mmdet.models.FocalLoss"},
    {"type": "mmdet.models.losses.focal_loss.FocalLoss"},
    {"type": "__import__"},
    {"type": "builtins.eval"},
    {"type": "subprocess.Popen"},
    {"type": "!!python/object/apply:os.system ['touch /tmp/losswire-pwned']"},
    {"type": "examples/plugins/poly_loss.py"},
    {"type": "FocalLoss", "gamma": {"type": "os.system", "cmd": "true"}},
    {"type": "FocalLoss", "gamma": "__import__('os').system('true')"},
    {"type": "FocalLoss", "sampler": {"type": "os.system"}},
    {"type": "FocalLoss", "sampler": {"type": "RandomSampler", "num": {"type": "os.system"}, "pos_fraction": 0.5}},
    {"type": "CrossEntropyLoss", "class_weight": [{"type": "os.system"}]},
    {"type": "FocalLoss", "_scope_": "mmdet"},
    {"type": "FocalLoss", "__class__": "os.system"},
    {"type": "FocalLoss", "custom_imports": {"imports": ["os"], "allow_failed_imports": False}},
    {"type": "FocalLoss", "init_cfg": {"type": "Pretrained", "checkpoint": "/etc/passwd"}},
]
WATCHED_EVENTS = {
    "import",
    "exec",
    "compile",
    "os.system",
    "subprocess.Popen",
    "os.posix_spawn",
    "os.exec",
    "os.fork",
    "ctypes.dlopen",
    "pickle.find_class",
    "marshal.loads",
    "open",
}


class AuditLog:
    """Python's audit events (any thread) while ``recording``: imports, code compiled or executed,
    processes, unpickling, files opened."""

    def __init__(self) -> None:
        self.recording = False
        self.events: list[tuple[str, str]] = []
        sys.addaudithook(self._hook)  # hooks cannot be removed: this one records only when asked

    def _hook(self, event: str, args: tuple) -> None:
        if self.recording and event in WATCHED_EVENTS:
            self.events.append((event, _describe(event, args)))


def _describe(event: str, args: tuple) -> str:
    if event == "compile":  # (source, filename)
        source = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        return f"{source!r} in {args[1]}"
    if event == "exec":  # (code object,)
        code = args[0]
        return f"{getattr(code, 'co_filename', '?')}: names {getattr(code, 'co_names', ())}"
    return repr(args)[:200]


@pytest.fixture(scope="module")
def audit() -> AuditLog:
    return AuditLog()


def test_no_request_imports_or_runs_anything(token_server: LosswireServer, token: str, audit: AuditLog):
    """Hostile configs get NOT_FOUND or INVALID_ARGUMENT through Describe, Evaluate and ModelInfer, and
    while answering them the server (this process) imports no module, starts no process, unpickles
    nothing, opens no file, and compiles or runs no code but what a benign request makes it run
    (``typing.get_type_hints`` evaluating a sampler's own annotations, such as ``'int'``)."""
    client = LossClient(address(token_server), credentials=Credentials(token=token), timeout=CALL_TIMEOUT)
    pred, labels = focal_inputs()
    metadata = [("authorization", f"Bearer {token}")]
    channel = grpc.insecure_channel(address(token_server))
    oip_stub = oip_grpc.GRPCInferenceServiceStub(channel)

    def attack(config: dict[str, Any]) -> list[grpc.StatusCode]:
        codes = []
        with pytest.raises(RemoteLossError) as caught:
            client.describe(config)
        codes.append(caught.value.code)
        term = pb.LossTerm(config=codec.encode_config(config), pred=codec.encode_tensor(pred))
        term.target.CopyFrom(codec.encode_value(labels))
        with pytest.raises(RemoteLossError) as caught:
            client.evaluate(pb.EvaluateRequest(terms=[term]))
        codes.append(caught.value.code)
        model, rest = str(config["type"]), {k: v for k, v in config.items() if k != "type"}
        with pytest.raises(grpc.RpcError) as caught_oip:
            inputs = {"pred": pred, "target": labels}
            oip_stub.ModelInfer(infer_request(model, inputs, config=rest), metadata=metadata, timeout=CALL_TIMEOUT)
        codes.append(caught_oip.value.code())
        return codes

    # benign mistakes first: what the error paths run on their own (lazy imports, annotations) is the baseline
    audit.recording = True
    try:
        attack({"type": "FocalLos"})
        attack({"type": "FocalLoss", "gamma": "two"})
        attack({"type": "FocalLoss", "sampler": {"type": "RandomSampler", "num": "many", "pos_fraction": 0.5}})
        baseline = {event for event in audit.events if event[0] in ("compile", "exec")}
        audit.events.clear()
        modules = set(sys.modules)
        outcomes = {repr(config): attack(config) for config in HOSTILE_CONFIGS}
    finally:
        audit.recording = False
    channel.close()
    for config, codes in outcomes.items():
        assert set(codes) <= {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}, (config, codes)
    assert set(sys.modules) == modules, sorted(set(sys.modules) - modules)
    assert [event for event in audit.events if event not in baseline] == []
    assert not Path("/tmp/losswire-pwned").exists()
