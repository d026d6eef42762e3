"""Who is calling: an identity is a name and a role, from a certificate or a bearer token."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    ADMIN = "admin"  # everything: any job, cancel any, drain nodes
    SUBMIT = "submit"  # run jobs; see and cancel its own
    READ = "read"  # see every job and node
    WORKER = "worker"  # register and heartbeat as the worker its credential names
    # A pool of workers sharing one credential (a Kubernetes Deployment's pods): NAME may
    # register as NAME or as any NAME-suffix (pod names).
    WORKERS = "workers"
    MASTER = "master"  # call workers' WorkerService
    CLIENT = "client"  # a certificate for the transport only: the identity comes from a token


CLIENT_ROLES = (Role.ADMIN, Role.SUBMIT, Role.READ)
WORKER_ROLES = (Role.WORKER, Role.WORKERS)


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    role: Role
    via: str  # "token", "cert", or "none" (an open loopback server: everyone is the local admin)
    peer: str = ""

    @property
    def sees_all_jobs(self) -> bool:
        return self.role in (Role.ADMIN, Role.READ)

    def may_act_as_worker(self, worker_id: str) -> bool:
        """Whether this caller may register (and heartbeat) as ``worker_id``."""
        if self.via == "none":
            return True
        if self.role == Role.WORKER:
            return worker_id == self.name
        return self.role == Role.WORKERS and (
            worker_id == self.name or worker_id.startswith(self.name + "-")
        )


LOCAL = Identity("local", Role.ADMIN, "none")
