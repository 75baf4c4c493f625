"""A small authoritative DNS server over UDP for tests: A records the test changes while the router resolves them
(as a headless Service's records change when its pods come and go)."""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}  # name (no trailing dot) -> IPv4 addresses
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._running = True
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def set(self, name: str, addresses: list[str]) -> None:
        self.records[name.rstrip(".")] = list(addresses)

    def stop(self) -> None:
        self._running = False
        self._thread.join(timeout=5)
        self._sock.close()

    def _serve(self) -> None:
        while self._running:
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.AA
            question = query.question[0]
            name = question.name.to_text().rstrip(".")
            addresses = self.records.get(name)
            if addresses is None:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.A and addresses:
                reply.answer.append(dns.rrset.from_text_list(question.name, 1, "IN", "A", addresses))
            self._sock.sendto(reply.to_wire(), peer)
