"""A misbehaving DNS server on loopback UDP for fault injection: per name, answer A records, SERVFAIL, NXDOMAIN,
garbage bytes, or nothing at all (the client times out). Built on dnspython's message API."""

from __future__ import annotations

import socket
import threading

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

SILENT = "silent"
SERVFAIL = "servfail"
GARBAGE = "garbage"


class FaultyDNS:
    def __init__(self, behaviour: dict[str, str | list[str]], host: str = "127.0.0.53") -> None:
        """`behaviour[name]` is SILENT, SERVFAIL, GARBAGE or a list of A addresses; other names get NXDOMAIN."""
        self.behaviour = {k.rstrip(".").lower(): v for k, v in behaviour.items()}
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()
        return f"{host}:{port}"

    def start(self) -> FaultyDNS:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            question = query.question[0]
            name = question.name.to_text().rstrip(".").lower()
            self.queries.append(name)
            action = self.behaviour.get(name)
            if action == SILENT:
                continue
            if action == GARBAGE:
                self.sock.sendto(data[:2] + b"\x81\x80\xff\xff garbage", peer)
                continue
            response = dns.message.make_response(query)
            if action == SERVFAIL:
                response.set_rcode(dns.rcode.SERVFAIL)
            elif isinstance(action, list):
                if question.rdtype == dns.rdatatype.A:
                    response.answer.append(
                        dns.rrset.from_text(question.name, 0, dns.rdataclass.IN, dns.rdatatype.A, *action)
                    )
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)
