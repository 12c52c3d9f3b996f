"""HTTPS and WSS served by Serve itself: browsers open the microphone only on a secure origin.

Serve 2.60's `http_options` take `ssl_certfile`/`ssl_keyfile` (its proxies hand them to uvicorn). This starts Serve with
a certificate for 127.0.0.1 made here, then checks that the API, the web page and a stream all go over TLS, that an
untrusted certificate is refused and that plain HTTP is no longer served.

The Python client has no CA option: like every OpenSSL client it trusts the file named by SSL_CERT_FILE (urllib for
the HTTP calls, websockets' default context for wss://), which is how it is used against a private CA, here too.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from ray import serve

from bench.harness import BASE_URL, ServeApp, local_ray, start_app
from bench.parity import ParitySet
from client.stream_client import stream_url

pytestmark = pytest.mark.serve

HTTPS_URL = BASE_URL.replace("http://", "https://")
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Certificate:
    cert: Path  # PEM; self-signed, so it is its own CA
    key: Path  # PEM, unencrypted


def make_certificate(directory: Path, host: str = HOST) -> Certificate:
    """A self-signed certificate for `host` (an IP address SAN) that can also serve as the CA that trusts it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"seedvc test {host}")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = Certificate(cert=directory / "cert.pem", key=directory / "key.pem")
    paths.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths.key.chmod(0o600)
    return paths


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_app(
    parity: ParitySet, certificate: Certificate, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeApp]:
    with local_ray(), pytest.MonkeyPatch.context() as env:
        # Serve's HTTP options are fixed when Serve starts: start it with TLS before the app runs.
        serve.start(
            http_options={
                "host": HOST,
                "port": 8000,
                "ssl_certfile": str(certificate.cert),
                "ssl_keyfile": str(certificate.key),
            }
        )
        # Set after Ray started, so that only this process trusts the test CA.
        env.setenv("SSL_CERT_FILE", str(certificate.cert))
        yield start_app(parity, tmp_path_factory.mktemp("voices"), converters=1, base_url=HTTPS_URL)


def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return response.status, response.read()


def test_https_healthz_with_the_certificate_as_ca(tls_app: ServeApp, certificate: Certificate) -> None:
    status, body = get(f"{HTTPS_URL}/healthz", ssl.create_default_context(cafile=certificate.cert))
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_the_web_page_is_served_over_https(tls_app: ServeApp, certificate: Certificate) -> None:
    status, body = get(f"{HTTPS_URL}/", ssl.create_default_context(cafile=certificate.cert))
    assert status == 200 and b"<html" in body.lower()


def test_a_certificate_the_client_does_not_trust_is_refused(
    tls_app: ServeApp, tmp_path: Path, certificate: Certificate
) -> None:
    other = make_certificate(tmp_path / "other")
    with pytest.raises(urllib.error.URLError) as refused:
        get(f"{HTTPS_URL}/healthz", ssl.create_default_context(cafile=other.cert))
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)


def test_plain_http_is_not_served(tls_app: ServeApp) -> None:
    with pytest.raises((OSError, http.client.HTTPException)):
        get(f"{BASE_URL}/healthz")


def test_a_stream_over_wss(tls_app: ServeApp) -> None:
    """Token and voice upload went over HTTPS (start_app); the stream goes over wss:// through the client."""
    assert stream_url(tls_app.base_url).startswith("wss://127.0.0.1:8000/")
    audio = tls_app.source_48k(2.0)
    result = tls_app.stream(audio, realtime=False, seed=0)
    assert result.error is None and result.end is not None, result.error
    assert result.ready is not None
    assert abs(len(result.output_48k) - len(audio)) <= 48 * result.ready["block_ms"] + 960
