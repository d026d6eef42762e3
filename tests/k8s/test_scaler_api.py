"""The Kubernetes scaler backend against a real kube-apiserver and controller manager: replicas
patched and read back, 409/403/404, the HPA floor, the Role in deploy/ (sufficient, and no
broader than needed), and every manifest in deploy/kubernetes accepted by the API server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import yaml
from lightkube import ApiError, Client, KubeConfig
from lightkube.codecs import load_all_yaml
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.autoscaling_v1 import (
    CrossVersionObjectReference,
    HorizontalPodAutoscalerSpec,
)
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.autoscaling_v1 import HorizontalPodAutoscaler
from lightkube.resources.core_v1 import Namespace, Pod, Secret
from lightkube.types import PatchType

from dist_exec.autoscaler.backend import Scale, ScaleForbidden, ScaleTargetMissing
from dist_exec.autoscaler.kubernetes import DELETION_COST, KubernetesBackend
from dist_exec.models import NodeId
from tests.autoscale_e2e import until
from tests.conftest import wait_for
from tests.k8s.conftest import (
    DEPLOY,
    WORKERS,
    Kube,
    create_workers,
    grant_scaler_role,
    manifest,
)

pytestmark = pytest.mark.k8s


def pods(kube: Kube, namespace: str) -> list[Pod]:
    return list(kube.admin().list(Pod, namespace=namespace, labels={"app": WORKERS}))


async def wait_pods(kube: Kube, namespace: str, count: int) -> list[Pod]:
    async def enough() -> list[Pod] | None:
        found = [
            p for p in pods(kube, namespace) if p.metadata and not p.metadata.deletionTimestamp
        ]
        return found if len(found) == count else None

    return await until(enough, 30, f"{count} worker pod(s)")


@pytest.fixture
async def admin_backend(kube: Kube, namespace: str) -> AsyncIterator[KubernetesBackend]:
    backend = KubernetesBackend.connect(WORKERS, namespace, str(kube.admin_kubeconfig))
    yield backend
    await backend.close()


@pytest.fixture
async def scaler_backend(kube: Kube, namespace: str) -> AsyncIterator[KubernetesBackend]:
    """As the user dist-exec-scaler, which has no rights until a test binds the Role."""
    backend = KubernetesBackend.connect(WORKERS, namespace, str(kube.scaler_kubeconfig))
    yield backend
    await backend.close()


def set_ready(kube: Kube, namespace: str, pod: str, ready: bool) -> None:
    """What a kubelet reports (there is none here)."""
    condition = {"type": "Ready", "status": "True" if ready else "False"}
    kube.admin().patch(
        Pod.Status,
        pod,
        {"status": {"phase": "Running", "conditions": [condition]}},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )


async def test_patches_replicas_and_reads_them_back(
    kube: Kube, namespace: str, admin_backend: KubernetesBackend
) -> None:
    create_workers(kube, namespace, 1)
    assert await admin_backend.current_scale() == Scale(desired=1, ready=0, floor=0)
    await admin_backend.scale_up(3)
    assert (await admin_backend.current_scale()).desired == 3
    # The deployment controller acts on it; pods marked Ready count as ready replicas.
    found = await wait_pods(kube, namespace, 3)
    for pod in found[:2]:
        assert pod.metadata is not None
        assert pod.metadata.name is not None
        set_ready(kube, namespace, pod.metadata.name, True)

    async def two_ready() -> bool:
        return (await admin_backend.current_scale()).ready == 2

    await until(two_ready, 30, "2 ready replicas")


async def test_patch_succeeds_where_read_modify_replace_conflicts(
    kube: Kube, namespace: str, admin_backend: KubernetesBackend
) -> None:
    """The controller keeps writing the Deployment (its .status), so a replace of the scale read
    before that gets 409 Conflict; the backend's PATCH carries no resourceVersion and
    succeeds every time, 20 times in a row while the controller churns."""
    create_workers(kube, namespace, 1)
    client = kube.admin()
    stale = client.get(Deployment.Scale, WORKERS, namespace=namespace)
    for replicas in range(2, 22):
        await admin_backend.scale_up(replicas)
        assert (await admin_backend.current_scale()).desired == replicas
    assert stale.spec is not None
    stale.spec.replicas = 5
    with pytest.raises(ApiError) as conflict:
        client.replace(stale, WORKERS, namespace=namespace)
    assert conflict.value.status.code == 409


async def test_missing_deployment_is_a_clear_error(admin_backend: KubernetesBackend) -> None:
    with pytest.raises(ScaleTargetMissing, match=r"not found .*check WORKER_DEPLOYMENT"):
        await admin_backend.current_scale()
    with pytest.raises(ScaleTargetMissing):
        await admin_backend.scale_up(2)


async def test_without_the_role_every_call_is_refused(
    kube: Kube, namespace: str, scaler_backend: KubernetesBackend
) -> None:
    create_workers(kube, namespace, 1)
    for call in (scaler_backend.current_scale(), scaler_backend.scale_up(2)):
        with pytest.raises(ScaleForbidden, match=r"HTTP 403.*deploy/kubernetes/rbac.yaml"):
            await call


async def retry_until_allowed(call: Callable[[], Awaitable[Any]]) -> Any:
    """RBAC takes a moment to see a new binding."""

    async def attempt() -> list[Any] | None:
        try:
            return [await call()]
        except ScaleForbidden:
            return None

    return (await until(attempt, 10, "the RoleBinding to take effect"))[0]


async def test_the_role_allows_every_scaler_call(
    kube: Kube, namespace: str, scaler_backend: KubernetesBackend
) -> None:
    create_workers(kube, namespace, 2)
    grant_scaler_role(kube, namespace)
    scale = await retry_until_allowed(scaler_backend.current_scale)
    assert scale == Scale(desired=2, ready=0, floor=0)
    await scaler_backend.scale_up(3)
    found = await wait_pods(kube, namespace, 3)
    names = sorted(NodeId(p.metadata.name) for p in found if p.metadata and p.metadata.name)
    for name in names:
        set_ready(kube, namespace, name, True)
    # A victim still Ready is not removed yet, but marked as the cheapest to delete.
    assert await scaler_backend.scale_down([names[0]]) == []
    victim = kube.admin().get(Pod, names[0], namespace=namespace)
    assert victim.metadata is not None
    assert victim.metadata.annotations is not None
    assert victim.metadata.annotations[DELETION_COST] == "-1000"
    assert (await scaler_backend.current_scale()).desired == 3
    # Once NotReady (drained), it goes: replicas drop by one.
    set_ready(kube, namespace, names[0], False)
    assert await scaler_backend.scale_down([names[0]]) == [names[0]]
    assert (await scaler_backend.current_scale()).desired == 2
    # The NotReady pod is the one the ReplicaSet deletes.
    remaining = await wait_pods(kube, namespace, 2)
    assert names[0] not in {p.metadata.name for p in remaining if p.metadata}


async def test_scale_in_waits_for_a_starting_pod_the_replicaset_would_delete_first(
    kube: Kube, namespace: str, admin_backend: KubernetesBackend
) -> None:
    """The ReplicaSet deletes a pod that is still starting (Pending, not Ready) before a
    drained victim, whatever the victim's deletion cost. Lowering the replicas then would
    remove the new pod and leave the victim: scale-in waits until no other pod is starting."""
    create_workers(kube, namespace, 2)
    first = await wait_pods(kube, namespace, 2)
    names = sorted(NodeId(p.metadata.name) for p in first if p.metadata and p.metadata.name)
    for name in names:
        set_ready(kube, namespace, name, True)
    await admin_backend.scale_up(3)  # a scale-up is under way when a victim has drained
    found = await wait_pods(kube, namespace, 3)
    (starting,) = {p.metadata.name for p in found if p.metadata} - set(names)
    victim = names[0]
    set_ready(kube, namespace, victim, False)
    assert await admin_backend.scale_down([victim]) == []
    assert (await admin_backend.current_scale()).desired == 3
    assert starting in admin_backend._waiting_for

    set_ready(kube, namespace, starting, True)
    assert await admin_backend.scale_down([victim]) == [victim]
    assert (await admin_backend.current_scale()).desired == 2
    remaining = await wait_pods(kube, namespace, 2)
    assert {p.metadata.name for p in remaining if p.metadata} == {names[1], starting}


def set_status(kube: Kube, namespace: str, pod: str, status: dict[str, Any]) -> None:
    kube.admin().patch(
        Pod.Status, pod, {"status": status}, namespace=namespace, patch_type=PatchType.MERGE
    )


def crash_looping(name: str) -> dict[str, Any]:
    """What a kubelet reports of a pod whose container keeps exiting."""
    waiting = {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}
    return {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [
            {
                "name": name,
                "image": "dist-exec:latest",
                "imageID": "",
                "ready": False,
                "restartCount": 4,
                "state": {"waiting": waiting},
            }
        ],
    }


@pytest.mark.parametrize("trouble", ["crash-looping", "evicted"])
async def test_scale_in_does_not_wait_for_a_pod_that_will_not_start(
    kube: Kube, namespace: str, admin_backend: KubernetesBackend, trouble: str
) -> None:
    """A new pod that crash-loops (or was evicted: Failed, which the ReplicaSet no longer
    counts) never becomes Ready: scale-in lowers the replicas at once instead of waiting
    START_WAIT_S for it."""
    create_workers(kube, namespace, 2)
    first = await wait_pods(kube, namespace, 2)
    names = sorted(NodeId(p.metadata.name) for p in first if p.metadata and p.metadata.name)
    for name in names:
        set_ready(kube, namespace, name, True)
    await admin_backend.scale_up(3)
    found = await wait_pods(kube, namespace, 3)
    (starting,) = {p.metadata.name for p in found if p.metadata} - set(names)
    victim = names[0]
    set_ready(kube, namespace, victim, False)
    assert await admin_backend.scale_down([victim]) == []  # it is starting: waited for
    assert starting in admin_backend._waiting_for

    if trouble == "crash-looping":
        container = found[0].spec.containers[0].name if found[0].spec else "worker"
        set_status(kube, namespace, starting, crash_looping(container))
    else:
        set_status(kube, namespace, starting, {"phase": "Failed", "reason": "Evicted"})
    assert await admin_backend.scale_down([victim]) == [victim]
    assert admin_backend._waiting_for == frozenset()
    assert (await admin_backend.current_scale()).desired == 2


async def test_applying_the_worker_manifest_again_keeps_the_scale(
    kube: Kube, namespace: str, admin_backend: KubernetesBackend
) -> None:
    """An image update re-applies worker.yaml; the replicas the scaler set must stay."""
    client = kube.admin()

    def apply() -> None:
        for obj in manifest("worker.yaml", namespace):
            client.apply(obj, field_manager="kubectl", force=True)

    apply()
    assert (await admin_backend.current_scale()).desired == 1  # a new Deployment's default
    await admin_backend.scale_up(3)
    apply()
    assert (await admin_backend.current_scale()).desired == 3


def test_the_role_grants_nothing_else(kube: Kube, namespace: str) -> None:
    create_workers(kube, namespace, 1)
    grant_scaler_role(kube, namespace)
    with Client(KubeConfig.from_file(kube.scaler_kubeconfig), namespace=namespace) as scaler:
        check_denials(kube, namespace, scaler)


def check_denials(kube: Kube, namespace: str, scaler: Client) -> None:

    def allowed(call: Callable[[], object]) -> bool:
        try:
            call()
        except ApiError as exc:
            if exc.status.code != 403:
                raise
            return False
        return True

    # The binding is effective (what the scaler needs works) ...
    wait_for(
        lambda: allowed(lambda: scaler.get(Deployment, WORKERS)),
        10,
        "the RoleBinding to take effect",
    )
    pod = wait_for(lambda: next(iter(pods(kube, namespace)), None), 30, "a worker pod")
    assert pod.metadata is not None
    assert pod.metadata.name
    pod_name: str = pod.metadata.name
    assert allowed(lambda: scaler.get(Pod, pod_name, namespace=namespace))
    # ... and nothing beyond it.
    deployment = scaler.get(Deployment, WORKERS)
    denied = {
        "replace the deployment": lambda: scaler.replace(deployment),
        "patch the deployment": lambda: scaler.patch(
            Deployment, WORKERS, {"spec": {"paused": True}}, patch_type=PatchType.MERGE
        ),
        "delete the deployment": lambda: scaler.delete(Deployment, WORKERS),
        "list deployments": lambda: list(scaler.list(Deployment)),
        "delete a pod": lambda: scaler.delete(Pod, pod_name, namespace=namespace),
        "list pods of another namespace": lambda: list(scaler.list(Pod, namespace="default")),
        "create a pod": lambda: scaler.create(Pod(metadata=ObjectMeta(name="x"))),
        "read secrets": lambda: list(scaler.list(Secret)),
        "get another deployment": lambda: scaler.get(Deployment, "other"),
        "scale another deployment": lambda: scaler.patch(
            Deployment.Scale, "other", {"spec": {"replicas": 1}}, patch_type=PatchType.MERGE
        ),
        "create an HPA": lambda: scaler.create(
            HorizontalPodAutoscaler(
                metadata=ObjectMeta(name="x"),
                spec=HorizontalPodAutoscalerSpec(
                    maxReplicas=2,
                    scaleTargetRef=CrossVersionObjectReference(kind="Deployment", name=WORKERS),
                ),
            )
        ),
    }
    wrongly_allowed = [what for what, call in denied.items() if allowed(call)]
    assert wrongly_allowed == []


def test_the_role_holds_exactly_the_rules_the_scaler_documents() -> None:
    docs = yaml.safe_load_all((DEPLOY / "rbac.yaml").read_text())
    role = next(d for d in docs if d["kind"] == "Role")
    rules = {
        (tuple(r["apiGroups"]), tuple(r["resources"]), tuple(sorted(r["verbs"])))
        for r in role["rules"]
    }
    assert rules == {
        (("apps",), ("deployments",), ("get",)),
        (("apps",), ("deployments/scale",), ("patch",)),
        (("",), ("pods",), ("get", "list", "patch")),
        (("autoscaling",), ("horizontalpodautoscalers",), ("list",)),
    }


async def test_an_hpa_on_the_same_deployment_sets_the_floor(
    kube: Kube, namespace: str, admin_backend: KubernetesBackend
) -> None:
    create_workers(kube, namespace, 1)
    client = kube.admin()
    for name, target, low in (("other", "something-else", 7), ("ours", WORKERS, 3)):
        client.create(
            HorizontalPodAutoscaler(
                metadata=ObjectMeta(name=name, namespace=namespace),
                spec=HorizontalPodAutoscalerSpec(
                    minReplicas=low,
                    maxReplicas=10,
                    scaleTargetRef=CrossVersionObjectReference(
                        apiVersion="apps/v1", kind="Deployment", name=target
                    ),
                ),
            )
        )
    assert (await admin_backend.current_scale()).floor == 3


def apply_hpa(client: Client, doc: dict[str, Any]) -> None:
    """hpa.yaml is autoscaling/v2 (Kubernetes >= 1.23); the API server here (1.20) serves the
    same fields as v2beta2, under which it is checked when v2 is not served."""
    assert doc["apiVersion"] == "autoscaling/v2"
    assert doc["spec"]["behavior"]["scaleDown"]["selectPolicy"] == "Disabled"  # scale-up only
    try:
        client.apply(load_all_yaml(yaml.safe_dump(doc))[0], field_manager="dist-exec-tests")
    except ApiError as exc:
        if exc.status.code != 404:
            raise
        older = create_namespaced_resource(
            "autoscaling", "v2beta2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"
        )
        hpa = older.from_dict({**doc, "apiVersion": "autoscaling/v2beta2"})
        client.apply(hpa, field_manager="dist-exec-tests")
        applied = client.get(older, doc["metadata"]["name"], namespace="dist-exec")
        assert applied["spec"]["behavior"]["scaleDown"]["selectPolicy"] == "Disabled"


def test_every_manifest_is_accepted_by_the_api_server(kube: Kube) -> None:
    client = kube.admin()
    # The namespace first; optional pieces (hpa.yaml, the kustomize patches *-patch.yaml) are
    # not in kustomization.yaml; patches go last, onto the objects they patch.
    optional = {"hpa.yaml"} | {f.name for f in DEPLOY.glob("*-patch.yaml")}
    base = sorted(
        f.name
        for f in DEPLOY.glob("*.yaml")
        if f.name not in {"namespace.yaml", "kustomization.yaml"} | optional
    )
    files = ["namespace.yaml", *base, *sorted(optional)]
    listed = (DEPLOY / "kustomization.yaml").read_text()
    assert all(f in listed for f in ["namespace.yaml", *base]), "kustomization.yaml misses a file"
    try:
        for name in files:
            if name.endswith("-patch.yaml"):  # strategic merge patches, as kustomize applies them
                for doc in yaml.safe_load_all((DEPLOY / name).read_text()):
                    assert doc["kind"] == "Deployment"
                    meta = doc["metadata"]
                    client.patch(
                        Deployment, meta["name"], doc, namespace=meta["namespace"],
                        patch_type=PatchType.STRATEGIC,
                    )  # fmt: skip
                continue
            if name == "hpa.yaml":
                apply_hpa(client, yaml.safe_load((DEPLOY / name).read_text()))
                continue
            for obj in load_all_yaml((DEPLOY / name).read_text()):
                client.apply(obj, field_manager="dist-exec-tests")
        worker = client.get(Deployment, WORKERS, namespace="dist-exec")
        assert worker.spec is not None
        assert worker.spec.template.spec is not None
        pod = worker.spec.template.spec
        env = {e.name: e for e in pod.containers[0].env or []}
        assert env["WORKER_ID"].valueFrom is not None
        assert env["WORKER_ID"].valueFrom.fieldRef is not None
        assert env["WORKER_ID"].valueFrom.fieldRef.fieldPath == "metadata.name"
        assert pod.terminationGracePeriodSeconds == 60
        probe = pod.containers[0].readinessProbe
        assert probe is not None
        assert probe.exec is not None
        assert probe.exec.command is not None
        assert "dist_exec.healthcheck" in probe.exec.command
        # The commands run as another user than the worker, which alone may read its key.
        worker_args = pod.containers[0].args or []
        assert worker_args[worker_args.index("--run-as") + 1] == "nobody"
        context = pod.containers[0].securityContext
        assert context is not None
        assert context.runAsUser == 0
        assert context.allowPrivilegeEscalation is False
        assert context.capabilities is not None
        assert context.capabilities.drop == ["ALL"]
        key = next(v for v in pod.volumes or [] if v.name == "tls")
        assert key.secret is not None
        assert key.secret.defaultMode == 0o400
        assert pod.securityContext is None or pod.securityContext.fsGroup is None
    finally:
        client.delete(Namespace, "dist-exec")
