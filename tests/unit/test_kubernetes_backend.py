"""KubernetesBackend's retry and error rules, over a scripted HTTP transport. The same calls run
against a real kube-apiserver in tests/k8s; this pins down which failures are retried."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx2
import pytest
import yaml
from lightkube import AsyncClient, KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.models.core_v1 import (
    ContainerState,
    ContainerStateWaiting,
    ContainerStatus,
    PodCondition,
    PodStatus,
)
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Pod

from dist_exec.autoscaler.backend import ScaleError, ScaleForbidden, ScaleTargetMissing
from dist_exec.autoscaler.kubernetes import (
    START_WAIT_S,
    KubernetesBackend,
    _may_start,
    load_kube_config,
)


def status(code: int, message: str) -> httpx2.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message}
    return httpx2.Response(code, json={**body, "code": code})


class Script:
    """Answers requests from a list, one per call; records what was asked."""

    def __init__(self, answers: list[httpx2.Response | Exception]) -> None:
        self.answers: Iterator[httpx2.Response | Exception] = iter(answers)
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        answer = next(self.answers)
        if isinstance(answer, Exception):
            raise answer
        return answer


def backend(script: Script) -> KubernetesBackend:
    client = AsyncClient(
        KubeConfig.from_one(
            cluster=Cluster(server="http://kube.test"), user=User(token="t"), namespace="ns"
        ),
        transport=httpx2.MockTransport(script),
    )
    return KubernetesBackend(client, "dist-exec-worker")


SCALE = {
    "kind": "Scale",
    "apiVersion": "autoscaling/v1",
    "metadata": {"name": "dist-exec-worker", "namespace": "ns"},
    "spec": {"replicas": 3},
}


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dist_exec.autoscaler.kubernetes.RETRY_BACKOFF_S", 0.0)


@pytest.mark.parametrize("code", [409, 429, 500, 503])
async def test_transient_answers_are_retried(code: int) -> None:
    script = Script([status(code, "try again"), httpx2.Response(200, json=SCALE)])
    scaler = backend(script)
    await scaler.set_replicas(3)
    assert len(script.requests) == 2
    sent = script.requests[-1]
    assert sent.method == "PATCH"
    assert sent.url.path == "/apis/apps/v1/namespaces/ns/deployments/dist-exec-worker/scale"
    assert sent.headers["content-type"] == "application/merge-patch+json"
    assert json.loads(sent.content) == {"spec": {"replicas": 3}}
    await scaler.close()


async def test_connection_errors_are_retried_then_reported() -> None:
    script = Script([httpx2.ConnectError("refused")] * 3)
    scaler = backend(script)
    with pytest.raises(ScaleError, match="cannot reach the Kubernetes API to scale to 2"):
        await scaler.set_replicas(2)
    assert len(script.requests) == 3
    await scaler.close()


async def test_a_conflict_that_persists_is_reported_after_the_retries() -> None:
    script = Script([status(409, "the object has been modified")] * 3)
    scaler = backend(script)
    with pytest.raises(ScaleError, match=r"\(HTTP 409\): the object has been modified"):
        await scaler.set_replicas(2)
    assert len(script.requests) == 3
    await scaler.close()


@pytest.mark.parametrize(
    ("code", "error", "text"),
    [
        (403, ScaleForbidden, "Kubernetes refused to scale to 2 deployment ns/dist-exec-worker"),
        (401, ScaleForbidden, "deploy/kubernetes/rbac.yaml"),
        (404, ScaleTargetMissing, "check WORKER_DEPLOYMENT and K8S_NAMESPACE"),
        (422, ScaleError, "(HTTP 422): invalid"),
    ],
)
async def test_permanent_answers_are_not_retried(
    code: int, error: type[ScaleError], text: str
) -> None:
    script = Script([status(code, "invalid")])
    scaler = backend(script)
    with pytest.raises(error) as raised:
        await scaler.set_replicas(2)
    assert text in str(raised.value)
    assert len(script.requests) == 1
    await scaler.close()


def kubeconfig(path: Path, current: str, clusters: dict[str, dict[str, str]]) -> Path:
    contexts = [{"name": f"ctx-{n}", "context": {"cluster": n, "user": "u"}} for n in clusters]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(
            {
                "current-context": current,
                "clusters": [{"name": n, "cluster": c} for n, c in clusters.items()],
                "contexts": contexts,
                "users": [{"name": "u", "user": {"client-key": "key.pem"}}],
            }
        )
    )
    return path


def test_a_kubeconfig_list_is_merged_as_kubectl_merges_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = kubeconfig(tmp_path / "a" / "config", "ctx-one", {"one": {"server": "https://a"}})
    second = kubeconfig(
        tmp_path / "b" / "config",
        "ctx-two",
        {
            "one": {"server": "https://b"},
            "two": {"server": "https://two", "certificate-authority": "ca.crt"},
        },
    )
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing'}:{first}::{second}")
    config = load_kube_config()
    assert config.current_context == "ctx-one"  # the first file that sets it
    assert config.clusters["one"].server == "https://a"  # the first file that names it
    assert config.clusters["two"].certificate_auth == str(tmp_path / "b" / "ca.crt")
    assert config.users["u"].client_key == str(tmp_path / "a" / "key.pem")
    assert config.get("ctx-two") is not None


def test_a_kubeconfig_list_of_missing_files_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'x'}:{tmp_path / 'y'}")
    with pytest.raises(
        ScaleError, match=r"cannot load Kubernetes credentials .* none of the files"
    ):
        load_kube_config()
    with pytest.raises(ScaleError, match="not found"):
        load_kube_config(str(tmp_path / "x"))


def test_a_kubeconfig_in_a_list_that_is_not_a_mapping_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = kubeconfig(tmp_path / "a" / "config", "ctx-one", {"one": {"server": "https://a"}})
    (tmp_path / "list.yaml").write_text("- just\n- a list\n")
    monkeypatch.setenv("KUBECONFIG", f"{first}:{tmp_path / 'list.yaml'}")
    with pytest.raises(ScaleError, match=r"list\.yaml is not a kubeconfig"):
        load_kube_config()


def pod(
    age_s: float = 10.0,
    phase: str = "Pending",
    ready: bool = False,
    waiting: str = "",
    init_waiting: str = "",
    deleting: bool = False,
) -> Pod:
    created = datetime.fromtimestamp(NOW - age_s, UTC)

    def waiting_for(reason: str) -> list[ContainerStatus] | None:
        state = ContainerState(waiting=ContainerStateWaiting(reason=reason))
        status = ContainerStatus(
            name="c", image="i", imageID="", ready=False, restartCount=1, state=state
        )
        return [status] if reason else None

    return Pod(
        metadata=ObjectMeta(
            name="p", creationTimestamp=created, deletionTimestamp=created if deleting else None
        ),
        status=PodStatus(
            phase=phase,
            conditions=[PodCondition(type="Ready", status="True" if ready else "False")],
            containerStatuses=waiting_for(waiting),
            initContainerStatuses=waiting_for(init_waiting),
        ),
    )


NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("case", "starting"),
    [
        (pod(), True),
        (pod(phase="Running"), True),
        (pod(phase="Running", waiting="ContainerCreating"), True),
        (pod(age_s=START_WAIT_S + 1), False),  # stuck for long: no loss
        (pod(phase="Running", ready=True), False),
        (pod(deleting=True), False),
        (pod(phase="Failed"), False),  # evicted: the ReplicaSet no longer counts it
        (pod(phase="Succeeded"), False),
        (pod(phase="Running", waiting="CrashLoopBackOff"), False),
        (pod(waiting="ImagePullBackOff"), False),
        (pod(init_waiting="ErrImagePull"), False),
        (pod(waiting="CreateContainerConfigError"), False),
    ],
)
def test_which_pods_scale_in_waits_for(case: Pod, starting: bool) -> None:
    assert _may_start(case, NOW) is starting
