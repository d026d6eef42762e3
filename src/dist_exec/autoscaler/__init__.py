"""The master's auto scaler: a pure policy (``policy``), the loop that applies it (``loop``) and
the backends that add and remove workers (``local``, ``kubernetes``) behind ``backend``."""

from __future__ import annotations

from pathlib import Path

from dist_exec.autoscaler.backend import ScaleBackend, ScaleError
from dist_exec.autoscaler.loop import Autoscaler, ClusterView
from dist_exec.clock import Clock
from dist_exec.config import AutoscalerConfig

__all__ = ["Autoscaler", "ScaleError", "make_autoscaler"]


def make_backend(config: AutoscalerConfig, master_address: str, log_dir: Path) -> ScaleBackend:
    if config.backend == "local":
        from dist_exec.autoscaler.local import LocalBackend

        return LocalBackend(
            master_address, log_dir, config.tasks_per_worker, config.local_worker_args
        )
    if config.backend == "kubernetes":
        from dist_exec.autoscaler.kubernetes import KubernetesBackend

        return KubernetesBackend.connect(config.deployment, config.namespace, config.kubeconfig)
    raise ScaleError(f"unknown scaler backend {config.backend!r}: use local or kubernetes")


def make_autoscaler(
    config: AutoscalerConfig,
    cluster: ClusterView,
    clock: Clock,
    master_address: str,
    log_dir: Path,
) -> Autoscaler | None:
    """The auto scaler the configuration asks for, or None (backend "none")."""
    if not config.enabled:
        return None
    return Autoscaler(config, cluster, make_backend(config, master_address, log_dir), clock)
