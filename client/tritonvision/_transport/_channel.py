"""How the SDK reaches a server: the gRPC target, TLS, metadata sent with every call, and the load-balancing
policy. :class:`Connection` holds these decisions (no I/O); :func:`open_channel` makes the channel that
:mod:`._grpc` uses.

With ``trace``, every call also carries the caller's current OpenTelemetry trace context (W3C
``traceparent``/``tracestate``, read when the call starts), so the spans a tracing Triton exports for the
request and each ensemble step join the caller's trace.

Targets are ``host:port`` (port 8001, Triton's gRPC port, when none is given) or any gRPC target URI:
``dns:///name:port`` re-resolved by gRPC (a Kubernetes headless Service's name resolves to every ready
pod), ``ipv4:10.0.0.1:8001,10.0.0.2:8001`` for a fixed list. With ``load_balancing="round_robin"`` gRPC
opens a connection to every address the target resolves to and spreads calls over them; the default
(``pick_first``) sends everything over one connection.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Union

import grpc

from ..extras import require

DEFAULT_PORT = 8001
DEFAULT_URL = f"127.0.0.1:{DEFAULT_PORT}"
URL_ENV = "TRITONVISION_URL"
# gRPC name-resolver schemes, passed to gRPC as they are.
TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")
LOAD_BALANCING = ("pick_first", "round_robin")

# tritonclient's message limits, plus a short reconnect backoff: gRPC otherwise waits up to two minutes before
# reconnecting to a restarted server, and every retry in between would fail at once with UNAVAILABLE.
MAX_MESSAGE_BYTES = 2**31 - 1
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

Pem = Union[bytes, str, os.PathLike, None]


def normalize_url(url: str | None) -> tuple[str, bool]:
    """The gRPC target for ``url`` and whether its scheme asks for TLS.

    None means ``$TRITONVISION_URL``, else ``127.0.0.1:8001``. ``grpc://`` and ``grpcs://`` (TLS) prefixes
    are accepted; an ``http(s)://`` URL is refused with a message, since Triton's HTTP endpoint is another
    port and protocol. A host without a port gets 8001."""
    if url is None:
        url = os.environ.get(URL_ENV) or DEFAULT_URL
    url = url.strip()
    if not url:
        raise ValueError("empty server address: give host:port (for example 127.0.0.1:8001)")
    lowered = url.lower()
    if lowered.startswith(("http://", "https://")):
        raise ValueError(
            f"{url!r} is an HTTP URL, but tritonvision talks to Triton over gRPC: give host:port of the gRPC "
            f"endpoint (Triton's default gRPC port is {DEFAULT_PORT}; 8000 is its HTTP port), e.g. "
            f"{url.split('://', 1)[1].split('/', 1)[0].rsplit(':', 1)[0]}:{DEFAULT_PORT}"
        )
    ssl = False
    for prefix, tls in (("grpcs://", True), ("grpc://", False)):
        if lowered.startswith(prefix):
            url, ssl = url[len(prefix):].rstrip("/"), tls
            break
    if lowered.startswith(TARGET_SCHEMES):
        return url, ssl
    if url.startswith("["):  # [IPv6] or [IPv6]:port
        return (url if "]:" in url else f"{url}:{DEFAULT_PORT}"), ssl
    if url.count(":") > 1:  # a bare IPv6 address
        return f"[{url}]:{DEFAULT_PORT}", ssl
    host, sep, port = url.rpartition(":")
    if not sep:
        return f"{url}:{DEFAULT_PORT}", ssl
    if not port.isdigit() or not host:
        raise ValueError(f"{url!r} is not host:port")
    return url, ssl


def _pem(value: Pem, what: str) -> bytes | None:
    """PEM bytes as given, or read from a file path."""
    if value is None or isinstance(value, bytes):
        return value
    path = Path(value)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {str(path)!r}: {exc.strerror}") from exc


@dataclass(frozen=True)
class Connection:
    """Where and how to connect; shared by the sync and asyncio clients."""

    target: str
    ssl: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    load_balancing: str | None = None
    tls_server_name: str | None = None
    trace: bool = False

    @classmethod
    def make(
        cls,
        url: str | None,
        *,
        ssl: bool = False,
        root_certificates: Pem = None,
        private_key: Pem = None,
        certificate_chain: Pem = None,
        headers: Mapping[str, str] | None = None,
        load_balancing: str | None = None,
        tls_server_name: str | None = None,
        trace: bool = False,
    ) -> Connection:
        target, scheme_ssl = normalize_url(url)
        if trace:  # fail where the client is made, not at its first call
            for module in ("opentelemetry.trace", "opentelemetry.propagate"):
                require(module, extra="trace", what="trace=True (sending the caller's trace context)")
        if load_balancing is not None and load_balancing not in LOAD_BALANCING:
            raise ValueError(f"load_balancing must be one of {LOAD_BALANCING}, not {load_balancing!r}")
        if (private_key is None) != (certificate_chain is None):
            raise ValueError("a client certificate needs both private_key and certificate_chain")
        tls_material = (root_certificates, private_key, certificate_chain)
        # gRPC metadata keys are lower-case ASCII; "grpc-" keys are reserved.
        pairs = tuple((str(k).lower(), str(v)) for k, v in (headers or {}).items())
        for key, _ in pairs:
            if not key or key.startswith("grpc-") or not all(c.isalnum() or c in "-_." for c in key):
                raise ValueError(f"invalid header name {key!r}")
        return cls(
            target=target,
            ssl=bool(ssl or scheme_ssl or tls_server_name or any(m is not None for m in tls_material)),
            root_certificates=_pem(root_certificates, "root certificates"),
            private_key=_pem(private_key, "private key"),
            certificate_chain=_pem(certificate_chain, "certificate chain"),
            headers=pairs,
            load_balancing=load_balancing,
            tls_server_name=tls_server_name or None,
            trace=bool(trace),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of a call starting now: the headers, and with ``trace`` the current trace context.
        Only a sampled span's context is sent: Triton traces every request that carries one, sampled or not,
        so sending an unsampled context would trace what the caller chose not to."""
        if not self.trace:
            return self.headers
        from opentelemetry import propagate, trace

        if not trace.get_current_span().get_span_context().trace_flags.sampled:
            return self.headers
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return self.headers + tuple((k.lower(), v) for k, v in carrier.items())

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.ssl:
            return None
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def channel_args(self) -> list[tuple[str, object]]:
        args = list(CHANNEL_ARGS)
        if self.load_balancing:
            args.append(("grpc.lb_policy_name", self.load_balancing))
        if self.ssl and self.tls_server_name:
            # The name the server's certificate must carry, where the target is an address or a list of them.
            args.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return args

    def servers(self) -> list[Connection]:
        """One connection per server the calls may reach: each address the target resolves to under
        ``round_robin``, else this connection (``pick_first`` keeps to one server). Control calls whose answer
        is one server's state (statistics) go to each of these, not to whichever one the balancer picks."""
        if self.load_balancing != "round_robin":
            return [self]
        host, addresses = resolve(self.target)
        # A certificate names the host, not the address the name resolved to.
        name = self.tls_server_name or (host if self.ssl else None)
        return [replace(self, target=a, load_balancing=None, tls_server_name=name) for a in addresses]


def _address_target(family: int, address: str, port: int | str) -> str:
    return f"ipv6:[{address}]:{port}" if family == socket.AF_INET6 or ":" in address else f"ipv4:{address}:{port}"


def resolve(target: str) -> tuple[str | None, list[str]]:
    """The host name in ``target`` (None for address lists) and the gRPC target of every address it resolves
    to now, as gRPC's own resolver sees it (``dns:``, ``ipv4:``/``ipv6:`` lists, ``host:port``). Unix sockets
    are one server. Raises :class:`OSError` when a name does not resolve."""
    lowered = target.lower()
    if lowered.startswith(("unix:", "unix-abstract:")):
        return None, [target]
    if lowered.startswith(("ipv4:", "ipv6:")):
        scheme, _, rest = target.partition(":")
        return None, [f"{scheme.lower()}:{a.strip()}" for a in rest.split(",") if a.strip()]
    if lowered.startswith("dns:"):
        target = target[4:]
        if target.startswith("//"):  # dns://authority/host:port: the authority is the DNS server, not needed here
            target = target[2:].partition("/")[2]
    if target.startswith("["):
        host, _, port = target[1:].partition("]")
        port = port.lstrip(":") or str(DEFAULT_PORT)
    else:
        host, sep, port = target.rpartition(":")
        if not sep:
            host, port = target, str(DEFAULT_PORT)
    found = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    return host, list(dict.fromkeys(_address_target(family, sockaddr[0], port) for family, _, _, _, sockaddr in found))


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the connection's metadata (:meth:`Connection.metadata`) to every call on the channel."""

    def __init__(self, conn: Connection):
        self._conn = conn

    def _details(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self._conn.metadata())

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(conn: Connection, aio: bool = False):
    """The channel for every call to the server. Without headers or ``trace`` no interceptor sits on the hot
    path."""
    module = grpc.aio if aio else grpc
    creds = conn.credentials()
    args = conn.channel_args()
    if aio:
        # No interceptor here: the aio transport passes Connection.metadata() with each call.
        return module.secure_channel(conn.target, creds, options=args) if creds else module.insecure_channel(conn.target, options=args)
    channel = grpc.secure_channel(conn.target, creds, options=args) if creds else grpc.insecure_channel(conn.target, options=args)
    return grpc.intercept_channel(channel, _Metadata(conn)) if conn.headers or conn.trace else channel
