"""A network partition between this host and a worker: a network namespace joined by a veth pair.

The worker runs inside the namespace (``ip netns exec NS`` execs it in place, so its pid is the
worker's); the master listens on the host end of the pair. ``cut()`` takes the host end down,
so packets in both directions are dropped (TCP connections stall, nothing is reset), as a real
partition does; ``heal()`` brings it back. Needs root (CAP_NET_ADMIN) and the ``ip`` tool.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import uuid

# 198.18.0.0/15 is reserved for network tests (RFC 2544): it collides with no real network.
_NET = ipaddress.IPv4Network("198.18.0.0/15")


def netns_unavailable() -> str:
    """Why a namespace partition cannot run here, or '' when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN); the proxy variant covers this"
    if shutil.which("ip") is None:
        return "the ip tool (iproute2) is not installed"
    probe = f"dxp{uuid.uuid4().hex[:8]}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"ip netns add fails here: {exc.stderr.strip()}"
    _ip("netns", "del", probe)
    return ""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


class NetnsPartition:
    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.ns = f"dxf{tag}"
        self.host_if = f"dxh{tag}"  # interface names: at most 15 characters
        self.ns_if = f"dxn{tag}"
        # A /30 of our own, picked at random so parallel runs do not collide.
        block = int(tag, 16) % (_NET.num_addresses // 4)
        base = _NET.network_address + 4 * block
        self.host_ip = str(base + 1)
        self.ns_ip = str(base + 2)
        self._created = False

    @property
    def prefix(self) -> list[str]:
        """Run a command inside the namespace."""
        return ["ip", "netns", "exec", self.ns]

    def create(self) -> None:
        _ip("netns", "add", self.ns)
        self._created = True
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.ns)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        inside = ["netns", "exec", self.ns, "ip"]
        _ip(*inside, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        _ip(*inside, "link", "set", self.ns_if, "up")
        _ip(*inside, "link", "set", "lo", "up")

    def cut(self) -> None:
        _ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")

    def destroy(self) -> None:
        """Deleting the namespace deletes the veth pair with it."""
        if self._created:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=10)
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)
            self._created = False
