"""`proxy/transparent.py` without NAT: a socket connected to the listener itself has no other original destination
(DNS steering); the NAT cases run end to end in test_transparent.py."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError

from egress_gateway.proxy.transparent import original_destination
from egress_gateway.settings import Settings, TransparentSettings


def _pair(family: int, host: str) -> tuple[socket.socket, socket.socket, socket.socket]:
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname()[:2], timeout=5)
    accepted, _ = server.accept()
    return server, client, accepted


def test_a_direct_connection_has_no_original_destination() -> None:
    server, client, accepted = _pair(socket.AF_INET, "127.0.0.1")
    with server, client, accepted:
        assert original_destination(accepted) is None


def test_an_ipv4_client_of_a_dual_stack_listener_has_no_original_destination() -> None:
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        server.bind(("::", 0))
    except OSError:
        server.close()
        return  # no IPv6 in this namespace
    server.listen(1)
    with server, socket.create_connection(("127.0.0.1", server.getsockname()[1]), timeout=5):
        accepted, _ = server.accept()
        with accepted:
            assert original_destination(accepted) is None


def test_a_socket_that_cannot_answer_has_no_original_destination() -> None:
    class Closed:
        family = socket.AF_INET

        def getsockname(self) -> tuple[str, int]:
            raise OSError("closed")

    assert original_destination(Closed()) is None


def test_settings_are_off_by_default_and_reject_a_listen_address_without_a_port() -> None:
    defaults = TransparentSettings()
    assert (defaults.tls_listen, defaults.http_listen, defaults.tls_port, defaults.http_port) == (None, None, 443, 80)
    assert defaults.check_original_destination is True
    with pytest.raises(ValidationError, match="tls_listen"):
        Settings(transparent={"tls_listen": "0.0.0.0"})
