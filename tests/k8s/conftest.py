"""A real Kubernetes control plane for the session: etcd, kube-apiserver (TLS, tokens, RBAC) and
kube-controller-manager (deployment and replicaset controllers) on 127.0.0.1, started by
scripts/k8s/start-kube.sh from the binaries scripts/k8s/build-kube.sh caches.

Without the binaries the tests are skipped with the reason, except under CI (CI=true), where
that is a failure: .ci/run builds them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lightkube import Client, KubeConfig
from lightkube.codecs import load_all_yaml
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.models.rbac_v1 import RoleRef, Subject
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Namespace
from lightkube.resources.rbac_authorization_v1 import RoleBinding

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"
KUBE_CACHE = Path(
    os.environ.get("DIST_EXEC_KUBE_CACHE", "~/.cache/dist-exec/kube-v1.20.2")
).expanduser()
SCALER_USER = "dist-exec-scaler"  # the token user start-kube.sh creates, with no rights
SCALER_ROLE = "dist-exec-scaler"  # the Role in deploy/kubernetes/rbac.yaml
WORKERS = "dist-exec-worker"  # the worker Deployment in deploy/kubernetes/worker.yaml


@dataclass(frozen=True)
class Kube:
    run_dir: Path
    admin_kubeconfig: Path
    scaler_kubeconfig: Path  # user dist-exec-scaler: no rights until a RoleBinding gives some
    client: Client  # as admin

    def admin(self) -> Client:
        return self.client


def _missing() -> list[str]:
    missing = [
        str(KUBE_CACHE / "bin" / b)
        for b in ("kube-apiserver", "kube-controller-manager")
        if not os.access(KUBE_CACHE / "bin" / b, os.X_OK)
    ]
    if shutil.which("etcd") is None:
        missing.append("etcd (apt-get install etcd-server)")
    return missing


def _stop(pids: list[int]) -> None:
    """Stop the control plane's processes (started by the script, so not our children)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 15
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    missing = _missing()
    if missing:
        reason = (
            f"no Kubernetes binaries: {', '.join(missing)} missing; build them once with "
            f"scripts/k8s/build-kube.sh {KUBE_CACHE} (or set DIST_EXEC_KUBE_CACHE)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"under CI the Kubernetes tests must run: {reason}")
        pytest.skip(reason)
    run = tmp_path_factory.mktemp("kube")
    started = subprocess.run(
        [str(REPO / "scripts" / "k8s" / "start-kube.sh"), str(run)],
        env={**os.environ, "KBIN": str(KUBE_CACHE / "bin"), "WITH_KCM": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    pids = [int(p) for p in (run / "pids").read_text().split()] if (run / "pids").exists() else []
    try:
        if started.returncode != 0:
            raise AssertionError(f"start-kube.sh failed:\n{started.stdout}\n{started.stderr}")
        with Client(
            KubeConfig.from_file(run / "kubeconfig"), field_manager="dist-exec-tests"
        ) as admin:
            yield Kube(run, run / "kubeconfig", run / "scaler.kubeconfig", admin)
    finally:
        _stop(pids)
        data = run / "etcd_data"
        if data.exists():
            shutil.rmtree(data.read_text().strip(), ignore_errors=True)


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    """A fresh namespace for one test."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    client = kube.admin()
    client.create(Namespace(metadata=ObjectMeta(name=name)))
    try:
        yield name
    finally:
        client.delete(Namespace, name)


def manifest(file: str, namespace: str) -> list[Any]:
    """The objects of deploy/kubernetes/FILE, moved into ``namespace``."""
    objects = []
    for obj in load_all_yaml((DEPLOY / file).read_text()):
        assert obj.metadata is not None
        obj.metadata.namespace = namespace
        for subject in getattr(obj, "subjects", None) or []:
            subject.namespace = namespace
        objects.append(obj)
    return objects


def grant_scaler_role(kube: Kube, namespace: str) -> None:
    """Apply deploy/kubernetes/rbac.yaml in ``namespace`` and bind its Role to the test's scaler
    user too (a ServiceAccount token would need the token controller)."""
    client = kube.admin()
    for obj in manifest("rbac.yaml", namespace):
        client.create(obj)
    client.create(
        RoleBinding(
            metadata=ObjectMeta(name="dist-exec-scaler-user", namespace=namespace),
            roleRef=RoleRef(apiGroup="rbac.authorization.k8s.io", kind="Role", name=SCALER_ROLE),
            subjects=[Subject(kind="User", name=SCALER_USER, apiGroup="rbac.authorization.k8s.io")],
        )
    )


def create_workers(kube: Kube, namespace: str, replicas: int) -> None:
    """The worker Deployment of deploy/kubernetes/worker.yaml in ``namespace``."""
    deployment = manifest("worker.yaml", namespace)[0]
    assert isinstance(deployment, Deployment)
    assert deployment.spec is not None
    deployment.spec.replicas = replicas
    kube.admin().create(deployment)
