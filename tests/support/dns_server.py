"""A scripted DNS server on loopback UDP: answers A queries from a list of answers, one per query, and counts.

Used to show that the gateway resolves a name once and connects to exactly the address it checked (DNS rebinding:
first answer public, later answers private or metadata).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping, Sequence

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class ScriptedDNS:
    def __init__(self, answers: Mapping[str, Sequence[str]], host: str = "127.0.0.1", ttl: int = 0) -> None:
        """`answers[name]` lists the A record of the 1st, 2nd, ... query; the last one repeats."""
        self.answers = {k.rstrip(".").lower(): list(v) for k, v in answers.items()}
        self.ttl = ttl
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

    def a_queries(self, name: str) -> int:
        return sum(1 for qname, qtype in self.queries if qname == name and qtype == "A")

    def start(self) -> ScriptedDNS:
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
            qtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, qtype))
            response = dns.message.make_response(query)
            script = self.answers.get(name)
            if script is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif qtype == "A":
                count = self.a_queries(name)
                address = script[min(count, len(script)) - 1]
                response.answer.append(
                    dns.rrset.from_text(question.name, self.ttl, dns.rdataclass.IN, dns.rdatatype.A, address)
                )
            self.sock.sendto(response.to_wire(), peer)
