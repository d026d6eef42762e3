"""The master's auto scaler options: flags, the environment variables of the design, checks.

Each flag has an environment variable (a flag wins). ``SCALING_ENABLED=true`` alone turns on
the Kubernetes backend, as the design's manifests expect.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import click

from dist_exec.autoscaler.backend import ScaleError
from dist_exec.config import SCALER_BACKENDS, AutoscalerConfig, format_duration, parse_duration

_META = "dist_exec.autoscaler"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


class _Seconds(click.ParamType):  # type: ignore[type-arg]
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            seconds = parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if seconds < 0:
            self.fail("must not be negative", param, ctx)
        return seconds


SECONDS = _Seconds()
_DEFAULTS = AutoscalerConfig()
# (flag, config field, env, type, default, help)
_OPTIONS: list[tuple[str, str, str, Any, Any, str]] = [
    ("--scaler", "backend", "SCALER", click.Choice(SCALER_BACKENDS), None,
     "Auto scaler backend: none, local (worker processes on this machine) or kubernetes "
     "(the worker Deployment). Default: kubernetes if SCALING_ENABLED=true, else none."),
    ("--min-replicas", "min_replicas", "MIN_REPLICAS", click.IntRange(0, 10_000),
     _DEFAULTS.min_replicas, "Fewest workers the scaler keeps."),
    ("--max-replicas", "max_replicas", "MAX_REPLICAS", click.IntRange(1, 10_000),
     _DEFAULTS.max_replicas, "Most workers the scaler asks for."),
    ("--tasks-per-worker", "tasks_per_worker", "TASKS_PER_WORKER", click.IntRange(1, 10_000),
     _DEFAULTS.tasks_per_worker, "Slots a new worker brings (local workers get this many)."),
    ("--scale-up-threshold", "scale_up_threshold", "SCALE_UP_THRESHOLD",
     click.IntRange(1, 1_000_000), _DEFAULTS.scale_up_threshold,
     "Pending tasks per worker above which one more worker is added."),
    ("--scale-down-delay", "scale_down_delay_s", "SCALE_DOWN_DELAY_SECONDS", SECONDS,
     _DEFAULTS.scale_down_delay_s, "A worker idle this long may be removed."),
    ("--scale-up-cooldown", "scale_up_cooldown_s", "COOLDOWN_SECONDS", SECONDS,
     _DEFAULTS.scale_up_cooldown_s, "Least time between two scale-ups."),
    ("--scale-down-cooldown", "scale_down_cooldown_s", "SCALE_DOWN_COOLDOWN_SECONDS", SECONDS,
     _DEFAULTS.scale_down_cooldown_s, "Least time after any scale event before a scale-down."),
    ("--min-worker-lifetime", "min_worker_lifetime_s", "MIN_WORKER_LIFETIME_SECONDS", SECONDS,
     _DEFAULTS.min_worker_lifetime_s, "A worker younger than this is never removed."),
    ("--scale-interval", "interval_s", "SCALE_INTERVAL_SECONDS", SECONDS,
     _DEFAULTS.interval_s, "How often the scaler looks."),
    ("--k8s-namespace", "namespace", "K8S_NAMESPACE", str, _DEFAULTS.namespace,
     "Namespace of the worker Deployment (default: the service account's or kubeconfig's)."),
    ("--worker-deployment", "deployment", "WORKER_DEPLOYMENT", str, _DEFAULTS.deployment,
     "The worker Deployment to scale."),
    ("--kubeconfig", "kubeconfig", "KUBECONFIG", str, "",
     "Kubeconfig file, or files separated by ':' merged as kubectl merges them (default: "
     "the in-cluster service account, else ~/.kube/config)."),
    ("--local-worker-arg", "local_worker_args", "", str, (),
     "Repeatable: one more argument for the local workers, e.g. "
     "--local-worker-arg=--tls-cert=FILE."),
]  # fmt: skip


def _store(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta.setdefault(_META, {})[param.name] = value
    return value


def scaler_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the auto scaler's flags; read them back with ``autoscaler_config(ctx)``."""
    for flag, field_name, env, kind, default, text in reversed(_OPTIONS):
        fn = click.option(
            flag,
            field_name,
            type=kind,
            envvar=env or None,
            multiple=isinstance(default, tuple),
            default=format_duration(default) if kind is SECONDS else default,
            show_default=default not in (None, "", ()),
            expose_value=False,
            callback=_store,
            help=f"{text} (env {env})" if env else text,
        )(fn)
    return fn


def autoscaler_config(ctx: click.Context) -> AutoscalerConfig:
    """The configuration the flags and environment give; ValueError when it makes no sense."""
    values = dict(ctx.meta.get(_META, {}))
    if values.get("backend") is None:
        enabled = os.environ.get("SCALING_ENABLED", "").strip().lower()
        if enabled not in _TRUE | _FALSE:
            raise ValueError(f"SCALING_ENABLED={enabled!r}: use true or false (or --scaler)")
        values["backend"] = "kubernetes" if enabled in _TRUE else "none"
    config = AutoscalerConfig(**values)
    if config.min_replicas > config.max_replicas:
        raise ValueError(
            f"--min-replicas ({config.min_replicas}) is above --max-replicas "
            f"({config.max_replicas})"
        )
    if config.interval_s <= 0:
        raise ValueError("--scale-interval must be longer than 0")
    if config.backend == "kubernetes":
        from dist_exec.autoscaler.kubernetes import check_name, client_for, load_kube_config

        try:
            check_name("--worker-deployment", config.deployment)
            if config.namespace:
                check_name("--k8s-namespace", config.namespace)
            client_for(load_kube_config(config.kubeconfig), config.namespace)
        except ScaleError as exc:
            raise ValueError(str(exc)) from None
    return config
