"""Where the router finds its workers: static lists, DNS names re-resolved, or pods watched in Kubernetes.

- Static: `--prefill HOST:PORT[,...]` (and `--decode`, `--colocated`).
- DNS: `--prefill dns://NAME:PORT`, e.g. a headless Service (`pdmesh-prefill.ns.svc.cluster.local`), which has
  one A/AAAA record per ready pod. Re-resolved every `--dns-interval` seconds through the system's resolvers
  (/etc/resolv.conf, with its search domains) or `--dns-server`. A name that does not resolve means no workers
  (a headless Service with no ready pod has no records); a resolver that does not answer keeps the last view.
- Kubernetes: `--kubernetes-selector` (services/router/discovery_kubernetes.py).

Each source yields full snapshots (role -> addresses); the pool serves their union (services/router/workers.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

from services.router.workers import Members

log = logging.getLogger("pdmesh.router")
DNS_SCHEME = "dns://"


@dataclass(frozen=True)
class DnsName:
    role: str
    name: str
    port: int

    @property
    def source(self) -> str:
        return f"dns:{self.role}:{self.name}:{self.port}"


def split_addresses(role: str, values: tuple[str, ...]) -> tuple[list[str], list[DnsName]]:
    """A role's `--prefill`-style values as static HOST:PORT addresses and DNS names; ValueError if malformed."""
    static, names = [], []
    for value in values:
        body = value.removeprefix(DNS_SCHEME)
        host, sep, port = body.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"--{role} {value!r}: expected HOST:PORT or dns://NAME:PORT (a port from 1 to 65535)"
            )
        if value.startswith(DNS_SCHEME):
            names.append(DnsName(role, host, int(port)))
        else:
            static.append(body)
    return static, names


def resolver(server: str | None) -> dns.asyncresolver.Resolver:
    """The system's resolvers, or `server` (HOST or HOST:PORT) alone."""
    if not server:
        return dns.asyncresolver.Resolver()
    r = dns.asyncresolver.Resolver(configure=False)
    host, _, port = server.partition(":") if server.count(":") == 1 else (server, "", "")
    r.nameservers = [host]
    r.port = int(port or 53)
    return r


async def resolve(r: dns.asyncresolver.Resolver, name: str, port: int) -> set[str]:
    """Every address `name` has (A and AAAA) with `port`; empty when the name has no records."""
    found: set[str] = set()
    for rdtype in ("A", "AAAA"):
        try:
            answer = await r.resolve(name, rdtype, search=True, lifetime=3.0)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        found |= {f"[{a.address}]:{port}" if rdtype == "AAAA" else f"{a.address}:{port}" for a in answer}
    return found


async def watch_dns(
    entry: DnsName, interval_s: float, r: dns.asyncresolver.Resolver
) -> AsyncIterator[Members]:
    """A snapshot of the name's workers whenever its records change (the first one at once)."""
    last: set[str] | None = None
    failing = False
    while True:
        try:
            found = await resolve(r, entry.name, entry.port)
            if failing:
                log.info("DNS name %s resolves again", entry.name)
            failing = False
        except (dns.exception.DNSException, OSError) as e:
            if not failing:
                log.warning("cannot resolve %s (%s); keeping its last %s workers", entry.name, e, entry.role)
            failing = True
            found = last if last is not None else set()
        if found != last:
            log.info("%s workers of %s: %s", entry.role, entry.name, ", ".join(sorted(found)) or "none")
            last = found
            yield {entry.role: set(found)}
        await asyncio.sleep(interval_s)
