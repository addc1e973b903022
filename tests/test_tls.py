"""TLS and mutual TLS on gRPC between the SDK and the bundled server started with the launcher's
:class:`ServerTLS`, with certificates made here."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import tritonvision as tv
from sdk_helpers import top
from tritonvision_server.launcher import ServerTLS, TritonServer

pytestmark = pytest.mark.slow


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by the CA; and an
    unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other_ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=tritonvision test {ca}",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.crt", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)
    return d


@pytest.fixture(scope="module")
def mutual_tls_server(cpu_repository, pki):
    tls = ServerTLS(cert=pki / "server.crt", key=pki / "server.key", client_ca=pki / "ca.crt")
    with TritonServer(cpu_repository, tls=tls) as server:
        yield server


def test_sdk_classifies_over_mutual_tls_with_its_client_certificate(mutual_tls_server, pki, photos):
    tls = dict(root_certificates=pki / "ca.crt", certificate_chain=pki / "client.crt", private_key=pki / "client.key")
    with tv.Classifier(mutual_tls_server.grpc_url, timeout=60, **tls) as clf:
        assert clf.is_ready()
        assert top(clf.classify(photos["chelsea"]))
        assert clf.statistics().models


@pytest.mark.parametrize("client", ["plaintext", "no client certificate", "unknown CA"])
def test_server_refuses_clients_without_a_trusted_certificate(mutual_tls_server, pki, photos, client):
    tls = {"plaintext": {},
           "no client certificate": dict(root_certificates=pki / "ca.crt"),
           "unknown CA": dict(root_certificates=pki / "other_ca.crt", certificate_chain=pki / "client.crt",
                              private_key=pki / "client.key")}[client]
    with tv.Classifier(mutual_tls_server.grpc_url, timeout=5, retry=tv.RetryPolicy(attempts=1), **tls) as clf:
        with pytest.raises((tv.ServerUnavailableError, tv.DeadlineExceededError)):
            clf.classify(photos["chelsea"])


def test_server_side_tls_without_client_certificates(cpu_repository, pki, photos):
    tls = ServerTLS(cert=pki / "server.crt", key=pki / "server.key")
    with TritonServer(cpu_repository, tls=tls) as server:
        with tv.Classifier(server.grpc_url, timeout=60, root_certificates=pki / "ca.crt") as clf:
            assert top(clf.classify(photos["coffee"]))
        with tv.Classifier(server.grpc_url, timeout=5, retry=tv.RetryPolicy(attempts=1)) as plaintext:
            with pytest.raises((tv.ServerUnavailableError, tv.DeadlineExceededError)):
                plaintext.classify(photos["coffee"])


def test_cli_probe_speaks_mutual_tls(mutual_tls_server, pki, photos, tmp_path):
    from tritonvision._cli import EXIT_OK, main

    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    probe = ["probe", "--url", mutual_tls_server.grpc_url, "--image", str(tmp_path / "cat.jpg"), "--timeout", "10"]
    assert main([*probe, "--root-certificates", str(pki / "ca.crt"), "--client-cert", str(pki / "client.crt"),
                 "--client-key", str(pki / "client.key")]) == EXIT_OK
    assert main([*probe, "--root-certificates", str(pki / "ca.crt")]) != EXIT_OK
    # The server's certificate names 127.0.0.1 and localhost: another expected name fails the handshake.
    assert main([*probe, "--root-certificates", str(pki / "ca.crt"), "--client-cert", str(pki / "client.crt"),
                 "--client-key", str(pki / "client.key"), "--tls-server-name", "localhost"]) == EXIT_OK
    assert main([*probe, "--root-certificates", str(pki / "ca.crt"), "--client-cert", str(pki / "client.crt"),
                 "--client-key", str(pki / "client.key"), "--tls-server-name", "elsewhere.example"]) != EXIT_OK


def test_locust_users_speak_mutual_tls(mutual_tls_server, pki, tmp_path):
    import csv
    import sys

    root = Path(__file__).resolve().parents[1]
    prefix = tmp_path / "tls"
    cmd = [sys.executable, "-m", "locust", "-f", str(root / "loadtest" / "locustfile.py"), "--headless",
           "--host", mutual_tls_server.grpc_url, "-u", "1", "-r", "1", "-t", "3s", "--csv", str(prefix),
           "--only-summary", "--root-certificates", str(pki / "ca.crt"), "--client-cert", str(pki / "client.crt"),
           "--client-key", str(pki / "client.key"), "UnaryUser"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    stats = prefix.with_name(prefix.name + "_stats.csv")
    assert stats.exists(), proc.stderr[-2000:]
    rows = {row["Name"]: row for row in csv.DictReader(stats.open())}
    good = rows["unary classify"]
    assert int(good["Request Count"]) > 0 and int(good["Failure Count"]) == 0


def test_tls_is_no_longer_a_public_type():
    """One client TLS API: the connection keyword arguments, not a separate TLS object."""
    assert "TLS" not in tv.__all__ and not hasattr(tv, "TLS")
