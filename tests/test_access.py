"""Access to the server's administrative protocols: shared-memory registration, the model repository,
statistics and the trace and log settings need a header on a server started with an access key, which the SDK sends when given it; the
python backend's regions are private to the server's user; shared memory is refused for a remote server."""

from __future__ import annotations

import stat

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

import tritonvision as tv
from sdk_helpers import top
from tritonvision_server.launcher import TritonServer

KEY = ("tv-admin", "s3cret-for-tests")


@pytest.fixture(scope="module")
def keyed_server(cpu_repository):
    with TritonServer(cpu_repository, access_key=KEY) as server:
        yield server


def test_python_backend_regions_are_private_to_the_servers_user(triton_server):
    regions = triton_server.leftover_shm()  # the live server's own regions, under its unique prefix
    assert regions
    for path in regions:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} is {oct(path.stat().st_mode)}"


def test_keyed_server_refuses_shared_memory_and_statistics_without_the_key(keyed_server):
    with grpcclient.InferenceServerClient(keyed_server.grpc_url) as client:
        for call in (lambda: client.register_system_shared_memory("x", "/x", 64),
                     lambda: client.get_system_shared_memory_status(),
                     lambda: client.get_inference_statistics(),
                     lambda: client.get_model_repository_index(),
                     # Open, these would let any client trace every request or log verbosely.
                     lambda: client.update_trace_settings(settings={"trace_rate": "1", "trace_level": ["TIMESTAMPS"]}),
                     lambda: client.get_trace_settings(),
                     lambda: client.update_log_settings({"log_verbose_level": 1}),
                     lambda: client.get_log_settings()):
            with pytest.raises(InferenceServerException, match="restricted"):
                call()


def test_keyed_server_answers_trace_and_log_settings_with_the_key(keyed_server):
    key = {f"triton-grpc-protocol-{KEY[0]}": KEY[1]}
    with grpcclient.InferenceServerClient(keyed_server.grpc_url) as client:
        assert "trace_rate" in client.get_trace_settings(headers=key, as_json=True)["settings"]
        assert "log_verbose_level" in client.get_log_settings(headers=key, as_json=True)["settings"]


def test_sdk_with_the_key_uses_shared_memory_and_statistics_on_a_keyed_server(keyed_server, photos):
    with tv.Classifier(keyed_server.grpc_url, timeout=60, shm="system", access_key=KEY) as clf:
        assert top(clf.classify(photos["chelsea"]))
        assert clf.statistics().models
    # Inference itself stays open: clients without the key classify over plain gRPC.
    with tv.Classifier(keyed_server.grpc_url, timeout=60) as clf:
        assert top(clf.classify(photos["chelsea"]))


def test_shared_memory_is_refused_for_a_server_on_another_host_unless_forced():
    with pytest.raises(tv.SharedMemoryError, match="not on this host"):
        tv.Classifier("192.0.2.1:8001", shm="system")
    assert tv.Classifier("192.0.2.1:8001", shm="auto").shm is None


def test_the_access_key_is_the_restricted_protocol_header_next_to_other_headers():
    # Triton 2.51 reads the key of --grpc-restricted-protocol=...:<name>=<value> from the gRPC metadata
    # triton-grpc-protocol-<name>; the SDK's access_key is that header, added to the caller's own.
    with tv.Classifier("127.0.0.1:8001", access_key=("TV-Admin", "v"), headers={"x-gateway": "g"}) as clf:
        assert dict(clf.connection.headers) == {"x-gateway": "g", "triton-grpc-protocol-tv-admin": "v"}
    with tv.Classifier("127.0.0.1:8001") as clf:
        assert clf.connection.headers == ()


def test_the_async_client_and_the_cli_pass_the_key(keyed_server, capsys):
    import asyncio

    from tritonvision._cli import EXIT_ERROR, EXIT_OK, main

    async def stats():
        async with tv.AsyncClassifier(keyed_server.grpc_url, timeout=60, access_key=KEY) as clf:
            return await clf.statistics()

    assert asyncio.run(stats()).models
    assert main(["stats", "--url", keyed_server.grpc_url, "--json", "--access-key", "=".join(KEY)]) == EXIT_OK
    assert main(["stats", "--url", keyed_server.grpc_url, "--json"]) == EXIT_ERROR
    capsys.readouterr()
