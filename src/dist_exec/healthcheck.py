"""``python -m dist_exec.healthcheck ADDRESS [--alive]``: a gRPC health probe for Kubernetes.

Exit 0 when the server at ADDRESS reports SERVING (readiness: a draining worker reports
NOT_SERVING, so its pod turns NotReady); with ``--alive``, when it answers at all (liveness: a
draining worker must not be restarted). Exit 1 otherwise, with one line on stderr. Kubernetes
>= 1.24 can probe gRPC natively; this works on every version, and speaks mutual TLS with the
files of the server it runs beside (DIST_EXEC_TLS_CA, _CERT, _KEY, as in tls-patch.yaml).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 2.0


def _channel(address: str) -> grpc.Channel:
    files = [os.environ.get(f"DIST_EXEC_TLS_{part}", "") for part in ("CA", "KEY", "CERT")]
    if not all(files):
        return grpc.insecure_channel(address)
    ca, key, cert = (Path(f).read_bytes() for f in files)
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca, key, cert))


def check(address: str, alive_only: bool) -> str | None:
    """None when healthy, else why not."""
    try:
        channel = _channel(address)
    except OSError as exc:
        return f"cannot read the TLS files: {exc}"
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S
            )
        except grpc.RpcError as exc:
            return f"{address}: {exc.code().name}: {exc.details()}"
    if alive_only or reply.status == health_pb2.HealthCheckResponse.SERVING:
        return None
    return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--alive"]
    if len(args) != 1:
        print("usage: python -m dist_exec.healthcheck HOST:PORT [--alive]", file=sys.stderr)  # noqa: T201
        return 2
    problem = check(args[0], "--alive" in argv)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)  # noqa: T201
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
