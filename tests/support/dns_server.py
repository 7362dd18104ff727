"""DNS servers on loopback UDP for tests, built on dnspython's message API.

`ScriptedDNS` answers A queries from a list of answers, one per query, and counts them: it shows that the gateway
resolves a name once and connects to exactly the address it checked (DNS rebinding: first answer public, later
answers private or metadata). `FaultyDNS` misbehaves per name for fault injection: A records, SERVFAIL, NXDOMAIN,
garbage bytes, or silence (the client times out).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Self

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

SILENT = "silent"
SERVFAIL = "servfail"
GARBAGE = "garbage"


class _LoopbackDNS:
    """The UDP socket, the serving thread and the query log; subclasses decide each answer."""

    def __init__(self, host: str) -> None:
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()
        return f"{host}:{port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def respond(self, query: dns.message.Message, raw: bytes, name: str, qtype: str) -> bytes | None:
        raise NotImplementedError

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
            qtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, qtype))
            answer = self.respond(query, data, name, qtype)
            if answer is not None:
                self.sock.sendto(answer, peer)


def _a_records(query: dns.message.Message, ttl: int, *addresses: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(query.question[0].name, ttl, dns.rdataclass.IN, dns.rdatatype.A, *addresses)


class ScriptedDNS(_LoopbackDNS):
    def __init__(self, answers: Mapping[str, Sequence[str]], host: str = "127.0.0.1", ttl: int = 0) -> None:
        """`answers[name]` lists the A record of the 1st, 2nd, ... query; the last one repeats."""
        super().__init__(host)
        self.answers = {k.rstrip(".").lower(): list(v) for k, v in answers.items()}
        self.ttl = ttl

    def a_queries(self, name: str) -> int:
        return sum(1 for qname, qtype in self.queries if qname == name and qtype == "A")

    def respond(self, query: dns.message.Message, raw: bytes, name: str, qtype: str) -> bytes | None:
        response = dns.message.make_response(query)
        script = self.answers.get(name)
        if script is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif qtype == "A":
            address = script[min(self.a_queries(name), len(script)) - 1]
            response.answer.append(_a_records(query, self.ttl, address))
        return response.to_wire()


class FaultyDNS(_LoopbackDNS):
    def __init__(self, behaviour: dict[str, str | list[str]], host: str = "127.0.0.53") -> None:
        """`behaviour[name]` is SILENT, SERVFAIL, GARBAGE or a list of A addresses; other names get NXDOMAIN."""
        super().__init__(host)
        self.behaviour = {k.rstrip(".").lower(): v for k, v in behaviour.items()}

    def respond(self, query: dns.message.Message, raw: bytes, name: str, qtype: str) -> bytes | None:
        action = self.behaviour.get(name)
        if action == SILENT:
            return None
        if action == GARBAGE:
            return raw[:2] + b"\x81\x80\xff\xff garbage"
        response = dns.message.make_response(query)
        if action == SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif isinstance(action, list):
            if qtype == "A":
                response.answer.append(_a_records(query, 0, *action))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()


class TableDNS(_LoopbackDNS):
    """Answers A and AAAA queries from a fixed table: `answers[name]` lists addresses of both families (each query
    gets those of its family, possibly none); other names get NXDOMAIN. For big answers too (one UDP datagram)."""

    def __init__(self, answers: Mapping[str, Sequence[str]], host: str = "127.0.0.1", ttl: int = 0) -> None:
        super().__init__(host)
        self.answers = {k.rstrip(".").lower(): list(v) for k, v in answers.items()}
        self.ttl = ttl

    def respond(self, query: dns.message.Message, raw: bytes, name: str, qtype: str) -> bytes | None:
        response = dns.message.make_response(query)
        listed = self.answers.get(name)
        if listed is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        family = ":" if qtype == "AAAA" else "."
        addresses = [a for a in listed if family in a and (qtype == "AAAA") == (":" in a)]
        if qtype in ("A", "AAAA") and addresses:
            rdtype = dns.rdatatype.AAAA if qtype == "AAAA" else dns.rdatatype.A
            response.answer.append(
                dns.rrset.from_text(query.question[0].name, self.ttl, dns.rdataclass.IN, rdtype, *addresses)
            )
        return response.to_wire(max_size=65535, want_shuffle=False)  # keep the listed order
