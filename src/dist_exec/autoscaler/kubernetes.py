"""KubernetesBackend: scales the worker Deployment through the Kubernetes API (lightkube).

The only module that imports a Kubernetes client. What it does, and the rights it needs (the
Role in deploy/kubernetes/rbac.yaml grants exactly these):

- reads the Deployment (desired and ready replicas)          deployments: get
- PATCHes its scale subresource, never read-modify-replace   deployments/scale: patch
  (the deployment controller keeps writing .status, so a replace would mostly get 409)
- reads victim pods (name = worker id) to see them NotReady   pods: get
- marks victims with the pod-deletion-cost annotation         pods: patch
  (honoured by Kubernetes >= 1.22; earlier versions ignore it and delete NotReady pods first)
- lists the Deployment's pods before lowering the replicas:   pods: list
  the ReplicaSet deletes pods that are still starting (unscheduled, Pending, not Ready yet)
  before any other, whatever their deletion cost, so the replicas are lowered only once no pod
  but the victims is starting. A pod that is stuck (crash-looping, its image not pulled, or
  starting for START_WAIT_S) is not waited for: removing it instead is no loss
- reads HPAs, to never go below the minReplicas of one that   horizontalpodautoscalers: list
  targets the same Deployment

Transient failures (connection errors, 409, 429, 5xx) are retried a few times; 401/403 and a
missing Deployment become errors that say what to fix.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import yaml
from lightkube import ApiError, AsyncClient, ConfigError, KubeConfig, operators
from lightkube.config.kubeconfig import DEFAULT_KUBECONFIG
from lightkube.models.meta_v1 import LabelSelector
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.autoscaling_v1 import HorizontalPodAutoscaler
from lightkube.resources.core_v1 import Pod
from lightkube.types import PatchType

from dist_exec.autoscaler.backend import Scale, ScaleError, ScaleForbidden, ScaleTargetMissing
from dist_exec.models import NodeId

T = TypeVar("T")
log = logging.getLogger(__name__)
# The HTTP client logs every request at INFO: one line per scaler look. Errors are ours to log.
logging.getLogger("httpx2").setLevel(logging.WARNING)
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
VICTIM_COST = "-1000"  # lower is deleted first; unmarked pods count as 0
RETRIES = 3
RETRY_BACKOFF_S = 0.2
TRANSIENT_CODES = {409, 429, 500, 502, 503, 504}
HPA_CACHE_S = 15.0
# A pod not Ready after this long is stuck: removing it rather than a victim is no loss, so
# scale-in does not wait for it. Nor for one that says it is stuck (STUCK_REASONS).
START_WAIT_S = 300.0
# Why a container waits when it will not start without a change (a kubelet's reasons): its
# pod would hold up scale-in for START_WAIT_S to no purpose.
STUCK_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
REQUEST_TIMEOUT_S = 5.0


def load_kube_config(path: str = "") -> KubeConfig:
    """``path``, else in-cluster service account, else $KUBECONFIG or ~/.kube/config. A
    path may be a list (``a:b``), merged as kubectl does."""
    try:
        if path:
            return _from_files(path)
        try:
            return KubeConfig.from_service_account()
        except ConfigError:
            return _from_files(os.environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG)
    except (ConfigError, OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
        where = path or "the service account, $KUBECONFIG or ~/.kube/config"
        raise ScaleError(f"cannot load Kubernetes credentials from {where}: {exc}") from exc


def _from_files(paths: str) -> KubeConfig:
    """One kubeconfig, or several separated by ':' merged as kubectl merges them: the first
    file to name a cluster, context or user (or to set current-context) wins; missing files
    are skipped; relative file names are relative to the file that holds them."""
    names = [Path(p).expanduser() for p in paths.split(os.pathsep) if p]
    if len(names) == 1:
        return KubeConfig.from_file(names[0])
    found = [name for name in names if name.is_file()]
    if not found:
        raise ConfigError(f"none of the files {paths} exists")
    merged: dict[str, Any] = {"clusters": [], "contexts": [], "users": []}
    for name in found:
        conf = yaml.safe_load(name.read_text()) or {}
        if not isinstance(conf, dict):
            raise ConfigError(f"{name} is not a kubeconfig (a YAML mapping)")
        merged.setdefault("current-context", conf.get("current-context") or None)
        if merged["current-context"] is None:
            del merged["current-context"]
        for section, item in (("clusters", "cluster"), ("contexts", "context"), ("users", "user")):
            known = {entry["name"] for entry in merged[section]}
            for entry in conf.get(section) or []:
                if entry["name"] not in known:
                    known.add(entry["name"])
                    merged[section].append(_absolute(entry, item, name.parent))
    return KubeConfig.from_dict(merged, fname=found[0])


_FILE_FIELDS = {
    "cluster": ("certificate-authority",),
    "user": ("client-certificate", "client-key", "tokenFile"),
}


def _absolute(entry: dict[str, Any], item: str, base: Path) -> dict[str, Any]:
    """A kubeconfig entry whose file names no longer depend on the file it came from."""
    body = dict(entry.get(item) or {})
    for field in _FILE_FIELDS.get(item, ()):
        if body.get(field):
            body[field] = str(base / Path(body[field]).expanduser())
    return {**entry, item: body}


def client_for(config: KubeConfig, namespace: str = "") -> AsyncClient:
    """A client of ``config``'s current context; ScaleError (one line) when it cannot be
    made: a context that is not there, a CA or key file missing."""
    try:
        return AsyncClient(
            config, namespace=namespace or None, timeout=httpx2.Timeout(REQUEST_TIMEOUT_S)
        )
    except (ConfigError, OSError, ValueError, KeyError) as exc:
        missing = [f for f in _files(config) if not os.path.exists(f)]
        detail = f"{', '.join(missing)} (named by the kubeconfig) not found" if missing else exc
        raise ScaleError(f"cannot use the Kubernetes credentials: {detail}") from exc


def _files(config: KubeConfig) -> list[str]:
    """The files the current context names (CA, client certificate and key)."""
    try:
        current = config.get()
    except ConfigError:
        return []
    if current is None:
        return []
    user = current.user
    names = [current.cluster.certificate_auth]
    if user is not None:
        names += [user.client_cert, user.client_key]
    return [str(name) for name in names if name]


_DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def check_name(option: str, name: str) -> None:
    """A Deployment's or namespace's name as Kubernetes takes it (DNS-1123 label)."""
    if len(name) > 63 or not _DNS_1123.fullmatch(name):
        raise ScaleError(
            f"{option} {name!r} is not a Kubernetes name: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63"
        )


class KubernetesBackend:
    def __init__(self, client: AsyncClient, deployment: str, namespace: str = "") -> None:
        self.client = client
        self.deployment = deployment
        self.namespace = namespace or client.namespace
        self._hpa_floor: tuple[float, int] | None = None  # (read at, minReplicas)
        self._marked: set[NodeId] = set()
        self._waiting_for: frozenset[str] = frozenset()  # starting pods a scale-in waits for

    @classmethod
    def connect(
        cls, deployment: str, namespace: str = "", kubeconfig: str = ""
    ) -> KubernetesBackend:
        return cls(client_for(load_kube_config(kubeconfig), namespace), deployment, namespace)

    @property
    def description(self) -> str:
        return f"kubernetes deployment {self.namespace}/{self.deployment}"

    def owns(self, node_id: NodeId) -> bool:
        # A Deployment's pods are named <deployment>-<replicaset hash>-<suffix>.
        return node_id.startswith(f"{self.deployment}-")

    async def close(self) -> None:
        await self.client.close()

    # ---- the three calls ----------------------------------------------------------------------

    async def current_scale(self) -> Scale:
        deployment = await self._deployment()
        assert deployment.spec is not None
        status = deployment.status
        return Scale(
            desired=deployment.spec.replicas or 0,
            ready=(status.readyReplicas or 0) if status is not None else 0,
            floor=await self.hpa_floor(),
        )

    async def scale_up(self, replicas: int) -> None:
        await self.set_replicas(replicas)

    async def scale_down(self, victims: Sequence[NodeId]) -> list[NodeId]:
        """Lower the replicas by the victims whose pods are NotReady (drained), after marking
        them as the cheapest pods to delete. Pods gone or being deleted count as removed."""
        ready_to_go: list[NodeId] = []
        gone: list[NodeId] = []
        for victim in victims:
            pod = await self._call(
                f"read pod {victim} of",
                lambda v=victim: self.client.get(Pod, v, namespace=self.namespace),  # type: ignore[misc]
                missing_ok=True,
            )
            if pod is None or (pod.metadata and pod.metadata.deletionTimestamp):
                gone.append(victim)  # already going: lowering the replicas would take another
                continue
            if victim not in self._marked:
                await self._mark(victim)
            if not _ready(pod):
                ready_to_go.append(victim)
        if ready_to_go:
            deployment = await self._deployment()
            assert deployment.spec is not None
            if await self._starting(deployment, set(victims)):
                ready_to_go = []  # lowering the replicas now would delete a starting pod
            else:
                replicas = deployment.spec.replicas or 0
                await self.set_replicas(max(0, replicas - len(ready_to_go)))
        self._marked -= set(gone) | set(ready_to_go)
        return [*ready_to_go, *gone]

    async def _starting(self, deployment: Deployment, victims: set[NodeId]) -> list[str]:
        """The Deployment's pods, other than the victims, that are still starting: the
        ReplicaSet would delete them before a victim (unscheduled < Pending < Running, not
        Ready < Ready, and only then the deletion cost; before 1.22, newer first)."""
        assert deployment.spec is not None
        labels = _label_selector(deployment.spec.selector)
        now = time.time()
        starting: list[str] = []

        async def read() -> None:
            starting.clear()  # (a try again after a transient failure starts over)
            async for pod in self.client.list(Pod, namespace=self.namespace, labels=labels):
                meta = pod.metadata
                if meta is not None and meta.name not in victims and _may_start(pod, now):
                    starting.append(meta.name or "?")

        await self._call("list the pods of", read)
        if frozenset(starting) != self._waiting_for and starting:
            log.info(
                "drained workers wait for pod(s) %s of %s to start: lowering the replicas "
                "now would delete those instead",
                ", ".join(sorted(starting)),
                self.description,
            )
        self._waiting_for = frozenset(starting)
        return starting

    # ---- helpers ------------------------------------------------------------------------------

    async def set_replicas(self, replicas: int) -> None:
        await self._call(
            f"scale to {replicas}",
            lambda: self.client.patch(
                Deployment.Scale,
                self.deployment,
                {"spec": {"replicas": replicas}},
                namespace=self.namespace,
                patch_type=PatchType.MERGE,
            ),
        )

    async def hpa_floor(self) -> int:
        """minReplicas of an HPA targeting this Deployment (0: none), cached for a while."""
        now = time.monotonic()
        if self._hpa_floor is not None and now - self._hpa_floor[0] < HPA_CACHE_S:
            return self._hpa_floor[1]

        async def read() -> int:
            floor = 0
            async for hpa in self.client.list(HorizontalPodAutoscaler, namespace=self.namespace):
                spec = hpa.spec
                if (
                    spec is not None
                    and spec.scaleTargetRef.kind == "Deployment"
                    and spec.scaleTargetRef.name == self.deployment
                ):
                    floor = max(floor, spec.minReplicas or 1)
            return floor

        floor = await self._call("list the HPAs of", read)
        assert floor is not None
        self._hpa_floor = (now, floor)
        return floor

    async def _deployment(self) -> Deployment:
        found = await self._call(
            "read",
            lambda: self.client.get(Deployment, self.deployment, namespace=self.namespace),
        )
        assert found is not None
        return found

    async def _mark(self, victim: NodeId) -> None:
        await self._call(
            f"annotate pod {victim} of",
            lambda: self.client.patch(
                Pod,
                victim,
                {"metadata": {"annotations": {DELETION_COST: VICTIM_COST}}},
                namespace=self.namespace,
                patch_type=PatchType.MERGE,
            ),
            missing_ok=True,
        )
        self._marked.add(victim)

    async def _call(
        self, what: str, call: Callable[[], Awaitable[T]], missing_ok: bool = False
    ) -> T | None:
        """``call`` with retries of transient failures; clear errors for the others."""
        target = f"deployment {self.namespace}/{self.deployment}"
        for attempt in range(1, RETRIES + 1):
            try:
                return await call()
            except ApiError as exc:
                code = exc.status.code or exc.response.status_code
                if code == 404 and missing_ok:
                    return None
                if code not in TRANSIENT_CODES or attempt == RETRIES:
                    raise _api_error(what, target, code, exc.status.message or str(exc)) from None
            except httpx2.HTTPError as exc:
                if attempt == RETRIES:
                    raise ScaleError(
                        f"cannot reach the Kubernetes API to {what} {target}: {exc!r}"
                    ) from None
            await asyncio.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
        raise AssertionError("unreachable")


def _api_error(what: str, target: str, code: int, message: str) -> ScaleError:
    if code in (401, 403):
        return ScaleForbidden(
            f"Kubernetes refused to {what} {target} (HTTP {code}): {message}; the master's "
            "service account needs the Role in deploy/kubernetes/rbac.yaml"
        )
    if code == 404:
        return ScaleTargetMissing(
            f"{target} not found (HTTP 404); check WORKER_DEPLOYMENT and K8S_NAMESPACE"
        )
    return ScaleError(f"Kubernetes failed to {what} {target} (HTTP {code}): {message}")


def _label_selector(selector: LabelSelector) -> dict[str, Any]:
    """A Deployment's pod selector as lightkube's ``labels`` argument."""
    labels: dict[str, Any] = dict(selector.matchLabels or {})
    for expression in selector.matchExpressions or []:
        values = expression.values or []
        match expression.operator:
            case "In":
                labels[expression.key] = operators.in_(values)
            case "NotIn":
                labels[expression.key] = operators.not_in(values)
            case "Exists":
                labels[expression.key] = operators.exists()
            case "DoesNotExist":
                labels[expression.key] = operators.not_exists()
            case other:
                raise ScaleError(f"the Deployment's selector has an unknown operator {other!r}")
    return labels


def _may_start(pod: Pod, now: float) -> bool:
    """Whether the ReplicaSet would delete ``pod`` before a drained victim, and it may still
    become Ready. Not: one being deleted, one that ended (Succeeded, Failed: evicted, say; the
    ReplicaSet neither counts nor deletes it), one Ready, one stuck."""
    meta, status = pod.metadata, pod.status
    if meta is None or meta.deletionTimestamp or _ready(pod):
        return False
    if status is not None and status.phase in ("Succeeded", "Failed"):
        return False
    created = meta.creationTimestamp
    if created is not None and now - created.timestamp() >= START_WAIT_S:
        return False
    return not _stuck(pod)


def _stuck(pod: Pod) -> bool:
    """A container of the pod waits for a reason in STUCK_REASONS: it will not start without
    a change. (An unschedulable pod is waited for: a cluster autoscaler may be adding a node.)"""
    status = pod.status
    if status is None:
        return False
    containers = [*(status.initContainerStatuses or []), *(status.containerStatuses or [])]
    return any(
        c.state is not None
        and c.state.waiting is not None
        and c.state.waiting.reason in STUCK_REASONS
        for c in containers
    )


def _ready(pod: Pod) -> bool:
    conditions = pod.status.conditions if pod.status is not None else None
    return any(c.type == "Ready" and c.status == "True" for c in conditions or [])
