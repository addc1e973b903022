"""Reaching servers: addresses, TLS (mutual), metadata headers and round-robin balancing over several
servers. Two real tritonservers (the light repository: real ensemble and validate step, trivial compute)
run with mutual TLS on loopback and require a header on every gRPC call (--grpc-restricted-protocol)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest

import tritonvision as tv
from tritonvision import spec
from tritonvision._cli import main
from tritonvision._transport._channel import Connection, normalize_url


# Triton 2.51 expects the key of --grpc-restricted-protocol=<protocols>:<key>=<value> as the header
# "triton-grpc-protocol-<key>".
KEY = "tv-api-key"
HEADER = (f"triton-grpc-protocol-{KEY}", "s3cret")


@pytest.mark.parametrize("url, target", [
    ("tv.example.com", "tv.example.com:8001"),
    ("tv.example.com:9001", "tv.example.com:9001"),
    ("grpc://10.0.0.5", "10.0.0.5:8001"),
    ("[::1]", "[::1]:8001"),
    ("::1", "[::1]:8001"),
    ("dns:///tv-headless.ml.svc.cluster.local:8001", "dns:///tv-headless.ml.svc.cluster.local:8001"),
    ("ipv4:10.0.0.1:8001,10.0.0.2:8001", "ipv4:10.0.0.1:8001,10.0.0.2:8001"),
])
def test_addresses_get_the_grpc_port_when_none_is_given(url, target):
    assert normalize_url(url) == (target, False)


def test_grpcs_urls_ask_for_tls_and_http_urls_are_refused_with_the_grpc_port():
    assert normalize_url("grpcs://tv.example.com") == ("tv.example.com:8001", True)
    with pytest.raises(ValueError, match="gRPC.*tv.example.com:8001"):
        normalize_url("http://tv.example.com:8000/v2")


def test_the_address_comes_from_the_environment_by_default(monkeypatch):
    monkeypatch.setenv("TRITONVISION_URL", "tv.internal")
    assert normalize_url(None) == ("tv.internal:8001", False)
    monkeypatch.delenv("TRITONVISION_URL")
    assert normalize_url(None) == ("127.0.0.1:8001", False)


def test_connection_options_are_checked_before_connecting(tmp_path):
    with pytest.raises(ValueError, match="load_balancing"):
        Connection.make("h", load_balancing="least_request_please")
    with pytest.raises(ValueError, match="both"):
        Connection.make("h", private_key=b"k")
    with pytest.raises(ValueError, match="header name"):
        Connection.make("h", headers={"grpc-timeout": "1"})
    with pytest.raises(ValueError, match="cannot read"):
        Connection.make("h", root_certificates=tmp_path / "missing.pem")
    conn = Connection.make("h", root_certificates=b"PEM", headers={"X-Key": "v"}, load_balancing="round_robin")
    assert conn.ssl and conn.headers == (("x-key", "v"),)
    assert ("grpc.lb_policy_name", "round_robin") in conn.channel_args()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made here."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=tritonvision test CA", cwd=d)
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


@pytest.fixture(scope="module")
def tls_servers(pki, tmp_path_factory):
    """Two servers requiring client certificates and the header on every gRPC call, with the other flags
    the Helm chart can add (connection age, summary latencies)."""
    from tritonvision_server.configs import write_light_repository
    from tritonvision_server.launcher import TritonServer

    repo = write_light_repository(tmp_path_factory.mktemp("light") / "repo")
    args = ["--grpc-use-ssl-mutual=true", f"--grpc-server-cert={pki / 'server.crt'}",
            f"--grpc-server-key={pki / 'server.key'}", f"--grpc-root-cert={pki / 'ca.crt'}",
            f"--grpc-restricted-protocol=health,metadata,inference,statistics,shared-memory:{KEY}={HEADER[1]}",
            "--grpc-max-connection-age=600000", "--grpc-max-connection-age-grace=30000",
            "--metrics-config=summary_latencies=true"]
    servers = [TritonServer(repo, extra_args=args) for _ in range(2)]
    try:
        for s in servers:
            s.start()
        yield servers
    finally:
        for s in servers:
            s.stop()


def tls(pki: Path, **kw) -> dict:
    return dict(root_certificates=pki / "ca.crt", private_key=pki / "client.key", certificate_chain=pki / "client.crt",
                headers=dict([HEADER]), timeout=60, **kw)


def test_mutual_tls_with_headers_classifies(tls_servers, pki, photos):
    with tv.Classifier(tls_servers[0].grpc_url, **tls(pki)) as clf:
        clf.wait_until_ready(timeout=30)
        assert len(clf.classify(photos["chelsea"], top_k=3)) == 3
        # Refused images are still refused one by one over TLS.
        with pytest.raises(tv.InvalidImageError):
            clf.classify(b"not an image")


@pytest.mark.parametrize("drop", ["root_certificates", "client_certificate", "headers"])
def test_a_client_missing_a_credential_is_refused(tls_servers, pki, photos, drop):
    options = tls(pki)
    if drop == "client_certificate":
        del options["private_key"], options["certificate_chain"]
    elif drop == "root_certificates":
        options["root_certificates"] = pki / "client.crt"  # not the CA that signed the server's certificate
    else:
        del options["headers"]
    options["timeout"] = 5
    with tv.Classifier(tls_servers[0].grpc_url, retry=tv.RetryPolicy(attempts=1), **options) as clf:
        with pytest.raises(tv.TritonVisionError) as info:
            clf.classify(photos["chelsea"])
    assert not isinstance(info.value, tv.InvalidImageError)


def test_the_async_client_takes_the_same_tls_and_headers(tls_servers, pki, photos):
    async def run():
        async with tv.AsyncClassifier(tls_servers[1].grpc_url, **tls(pki)) as clf:
            one = await clf.classify(photos["coffee"], top_k=2)
            streamed = [c async for c in clf.classify_stream([photos["chelsea"], b"broken", photos["coffee"]])]
            return one, streamed

    one, streamed = asyncio.run(run())
    assert len(one) == 2
    assert [c.ok for c in streamed] == [True, False, True]


def _ensemble_successes(server, pki) -> int:
    with tv.Classifier(server.grpc_url, **tls(pki)) as clf:
        return clf.statistics().models[spec.ENSEMBLE].success.count


def _until_both_connected(clf, servers, pki, photos, timeout: float = 60.0) -> None:
    """Calls until every server has answered one: round_robin sends calls only over connections that are up,
    and the second TLS handshake may finish after many calls on a loaded machine."""
    before = [_ensemble_successes(s, pki) for s in servers]
    deadline = time.monotonic() + timeout
    while min(_ensemble_successes(s, pki) - b for s, b in zip(servers, before)) == 0:
        assert time.monotonic() < deadline, "round_robin never reached both servers"
        clf.classify(photos["chelsea"], top_k=1)


@pytest.mark.parametrize("policy", ["round_robin", None])
def test_round_robin_spreads_calls_over_every_address_of_the_target(tls_servers, pki, photos, policy):
    target = "ipv4:" + ",".join(f"127.0.0.1:{s.grpc_port}" for s in tls_servers)
    with tv.Classifier(target, load_balancing=policy, tls_server_name="localhost", **tls(pki)) as clf:
        if policy == "round_robin":
            _until_both_connected(clf, tls_servers, pki, photos)
        before = [_ensemble_successes(s, pki) for s in tls_servers]
        for _ in range(12):
            clf.classify(photos["chelsea"], top_k=1)
    served = [_ensemble_successes(s, pki) - b for s, b in zip(tls_servers, before)]
    assert sum(served) == 12
    if policy == "round_robin":
        # Calls alternate over connections that are up: 6 each, give or take a reconnection.
        assert min(served) >= 3, f"round_robin should spread the calls, got {served}"
    else:
        assert sorted(served) == [0, 12], "the default policy keeps every call on one connection"


def test_the_cli_takes_tls_files_headers_and_the_environment_address(tls_servers, pki, photos, tmp_path, monkeypatch, capsys):
    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    monkeypatch.setenv("TRITONVISION_URL", tls_servers[0].grpc_url)
    code = main(["classify", "--json", "--root-certificates", str(pki / "ca.crt"), "--client-key", str(pki / "client.key"),
                 "--client-cert", str(pki / "client.crt"), "--header", f"{HEADER[0]}={HEADER[1]}", str(tmp_path / "cat.jpg")])
    assert code == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["image"].endswith("cat.jpg") and len(result["predictions"]) == 5


def test_statistics_over_round_robin_count_every_server_once(tls_servers, pki, photos, capsys, monkeypatch):
    # Each snapshot asks every address the target resolves to; one connection would ask whichever server the
    # balancer picked, a different one from call to call, and the difference of two such snapshots means nothing.
    target = "ipv4:" + ",".join(f"127.0.0.1:{s.grpc_port}" for s in tls_servers)
    with tv.Classifier(target, load_balancing="round_robin", tls_server_name="localhost", **tls(pki)) as clf:
        snapshots = [clf.statistics() for _ in range(4)]
        assert len({s.models[spec.ENSEMBLE].success.count for s in snapshots}) == 1
        assert sorted(snapshots[0].servers) == sorted(f"ipv4:127.0.0.1:{s.grpc_port}" for s in tls_servers)
        apart = [_ensemble_successes(s, pki) for s in tls_servers]
        assert snapshots[0].models[spec.ENSEMBLE].success.count == sum(apart)
        _until_both_connected(clf, tls_servers, pki, photos)
        apart = [_ensemble_successes(s, pki) for s in tls_servers]
        with clf.measure() as m:
            for _ in range(12):
                clf.classify(photos["chelsea"], top_k=1)
        served = [_ensemble_successes(s, pki) - b for s, b in zip(tls_servers, apart)]
    assert min(served) >= 3, served  # both servers took part
    assert m.breakdown[spec.ENSEMBLE].requests == 12 and m.breakdown[spec.RESNET50].inferences == 12
    assert not m.breakdown.restarted and len(m.breakdown.servers) == 2
    assert sorted(own[spec.ENSEMBLE].requests for own in m.breakdown.by_server.values()) == sorted(served)

    async def run():
        async with tv.AsyncClassifier(target, load_balancing="round_robin", tls_server_name="localhost",
                                      **tls(pki)) as clf:
            async with clf.measure() as m:
                for _ in range(6):
                    await clf.classify(photos["coffee"], top_k=1)
            return m.breakdown

    breakdown = asyncio.run(run())
    assert breakdown[spec.ENSEMBLE].requests == 6 and len(breakdown.servers) == 2

    # The CLI says what it summed.
    code = main(["stats", "--url", target, "--load-balancing", "round_robin", "--tls-server-name", "localhost",
                 "--root-certificates", str(pki / "ca.crt"), "--client-key", str(pki / "client.key"),
                 "--client-cert", str(pki / "client.crt"), "--header", f"{HEADER[0]}={HEADER[1]}", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["servers"]) == 2 and set(out["by_server"]) == set(out["servers"])
    assert next(s for s in out["stages"] if s["model"] == spec.ENSEMBLE)["requests"] == sum(
        _ensemble_successes(s, pki) for s in tls_servers)
    code = main(["stats", "--url", target, "--load-balancing", "round_robin", "--tls-server-name", "localhost",
                 "--root-certificates", str(pki / "ca.crt"), "--client-key", str(pki / "client.key"),
                 "--client-cert", str(pki / "client.crt"), "--header", f"{HEADER[0]}={HEADER[1]}", "--per-server"])
    text = capsys.readouterr().out
    assert code == 0 and "summed over 2 servers" in text
    assert all(f"\nipv4:127.0.0.1:{s.grpc_port}\nmodel" in text for s in tls_servers), text


@pytest.mark.slow
def test_locust_users_connect_with_tls_headers_and_round_robin(tls_servers, pki, tmp_path, monkeypatch):
    from locust_helpers import locust

    monkeypatch.setenv("TRITONVISION_HEADERS", f"{HEADER[0]}={HEADER[1]}")
    target = "ipv4:" + ",".join(f"127.0.0.1:{s.grpc_port}" for s in tls_servers)
    # The certificate names localhost; the target is a list of addresses.
    monkeypatch.setenv("TRITONVISION_TLS_SERVER_NAME", "localhost")
    rows, _ = locust(target, "UnaryUser", tmp_path, "--root-certificates", str(pki / "ca.crt"),
                     "--client-cert", str(pki / "client.crt"), "--client-key", str(pki / "client.key"),
                     "--load-balancing", "round_robin")
    good = rows["unary classify"]
    assert int(good["Request Count"]) >= 2 and int(good["Failure Count"]) == 0


def test_summary_latencies_put_p99_per_step_in_prometheus(tls_servers, pki, photos):
    import urllib.request

    with tv.Classifier(tls_servers[0].grpc_url, **tls(pki)) as clf:
        clf.classify(photos["chelsea"])
    text = urllib.request.urlopen(tls_servers[0].metrics_url, timeout=10).read().decode()
    for step in (spec.ENSEMBLE, spec.PREPROCESS, spec.RESNET50):
        assert f'nv_inference_queue_summary_us{{model="{step}",version="1",quantile="0.99"}}' in text
