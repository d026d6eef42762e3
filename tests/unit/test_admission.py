"""Rate limits, the command policy and priority aging: pure logic, with a fake clock."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from dist_exec.errors import PolicyDenied, RateLimited, ResourceExhausted
from dist_exec.executors.command import CommandExecutor, CommandPolicy, CommandSpec
from dist_exec.master import admission
from dist_exec.master.admission import RateLimiter
from dist_exec.master.balancer import RoundRobinBalancer
from dist_exec.master.scheduler import Scheduler
from dist_exec.models import JobId, TaskSpec


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)


def test_bucket_allows_the_burst_then_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock, rate_per_s=10, burst=5)
    for _ in range(5):
        limiter.admit("a")
    with pytest.raises(RateLimited, match=r"10 jobs/s, burst 5; retry in 0\.10s") as info:
        limiter.admit("a")
    assert info.value.trailing_metadata == (("retry-after-ms", "100"),)
    limiter.admit("b")  # another client has its own bucket
    clock.t += 0.1
    limiter.admit("a")
    clock.t += 10  # refills only up to the burst
    for _ in range(5):
        limiter.admit("a")
    with pytest.raises(RateLimited):
        limiter.admit("a")


def test_a_batch_costs_one_token_per_job_and_is_refused_whole() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock, rate_per_s=1, burst=10)
    limiter.admit("a", 8)
    with pytest.raises(RateLimited, match=r"retry in 1\.00s"):
        limiter.admit("a", 3)
    limiter.admit("a", 2)  # the refused batch took nothing
    with pytest.raises(ResourceExhausted, match="larger than the burst of 10"):
        limiter.admit("a", 11)


def test_beyond_its_clients_the_limiter_forgets_the_least_recently_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only refilled buckets were forgotten, with a scan of them all for each new client: many
    clients active at once grew it past its bound, each new one at the cost of a scan."""
    monkeypatch.setattr(admission, "MAX_CLIENTS", 3)
    limiter = RateLimiter(FakeClock(), rate_per_s=0.001, burst=1)
    for client in ("a", "b", "c"):
        limiter.admit(client)
    with pytest.raises(RateLimited):
        limiter.admit("a")  # (seen again: "b" is now the least recently seen)
    limiter.admit("d")
    assert len(limiter._buckets) == 3
    limiter.admit("b")  # forgotten: a full bucket again
    with pytest.raises(RateLimited):
        limiter.admit("a")  # remembered


def test_limiter_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="rate must be > 0"):
        RateLimiter(FakeClock(), 0, 1)


@pytest.mark.parametrize(
    ("policy", "spec", "message"),
    [
        (CommandPolicy(blocked=("rm",)), CommandSpec("rm", ["-rf", "/"]), "blocked by rule 'rm'"),
        (CommandPolicy(blocked=("rm",)), CommandSpec("/bin/rm", ["x"]), "blocked by rule 'rm'"),
        (
            CommandPolicy(blocked=("*rm -rf*",)),
            CommandSpec("cd /; rm -rf x", shell=True),
            "blocked by rule '*rm -rf*'",
        ),
        (
            CommandPolicy(allowed=("ls", "echo")),
            CommandSpec("curl", ["x"]),
            "'curl' is not in the allowed commands (ls, echo)",
        ),
        (
            CommandPolicy(allowed=("ls",)),
            CommandSpec("ls /tmp", shell=True),
            "'sh' is not in the allowed commands",
        ),
        # A shell string names the programs it starts: each is checked against the block list.
        (CommandPolicy(blocked=("rm",)), CommandSpec("rm /x", shell=True), "'rm' is blocked"),
        (
            CommandPolicy(blocked=("curl",)),
            CommandSpec('echo "a;b"; if true; then /usr/bin/curl x; fi', shell=True),
            "'curl' is blocked by rule 'curl'",
        ),
        # An allowed name is not any program of that name: not one in another directory, nor
        # one found through a PATH the job sets, nor one relative to the working directory.
        (
            CommandPolicy(allowed=("ls",)),
            CommandSpec("/tmp/evil/ls"),
            "'/tmp/evil/ls' is not in the allowed commands (ls)",
        ),
        (
            CommandPolicy(allowed=("ls",)),
            CommandSpec("/usr/bin/../../tmp/ls"),
            "is not in the allowed commands",
        ),
        (CommandPolicy(allowed=("ls",)), CommandSpec("./ls"), "is not in the allowed commands"),
        (
            CommandPolicy(allowed=("/opt/tools/*",)),
            CommandSpec("ls"),
            "'ls' is not in the allowed commands",
        ),
        (
            CommandPolicy(allowed=("ls",)),
            CommandSpec("ls", env={"PATH": "/tmp/evil"}),
            "environment variable 'PATH' may not be set under an allow-list",
        ),
        (
            CommandPolicy(allowed=("ldd",)),
            CommandSpec("ldd", env={"BASH_FUNC_printf%%": "() { id; }"}),
            "environment variable 'BASH_FUNC_printf%%' may not be set",
        ),
        (
            CommandPolicy(allowed=("ls",)),
            CommandSpec("ls", env={"LD_PRELOAD": "/tmp/evil.so"}),
            "'LD_PRELOAD' may not be set",
        ),
        (  # under an allow-list, only the environment it names (and a few harmless ones)
            CommandPolicy(allowed=("make",), allowed_env=("BUILD_*",)),
            CommandSpec("make", env={"BUILD_ID": "7", "MAKEFLAGS": "-j1 --eval=x"}),
            "'MAKEFLAGS' is not in the allowed environment (LANG, LC_*, TZ, TERM, COLUMNS, "
            "LINES, NO_COLOR, BUILD_*); the worker's --allow-env adds names",
        ),
        (  # --allow-env never admits what is known to run code
            CommandPolicy(allowed=("ls",), allowed_env=("*",)),
            CommandSpec("ls", env={"LD_PRELOAD": "/tmp/evil.so"}),
            "'LD_PRELOAD' may not be set",
        ),
        (  # less runs LESSOPEN's command on the file it shows
            CommandPolicy(allowed=("less",)),
            CommandSpec("less", ["/etc/hostname"], env={"LESSOPEN": "|touch /tmp/x; cat %s"}),
            "'LESSOPEN' may not be set",
        ),
        (
            CommandPolicy(allowed=("git",)),
            CommandSpec("git", ["status"], env={"XDG_CONFIG_HOME": "/tmp/evil"}),
            "'XDG_CONFIG_HOME' may not be set",
        ),
    ],
)
def test_policy_refuses_with_the_rule(
    policy: CommandPolicy, spec: CommandSpec, message: str
) -> None:
    with pytest.raises(PolicyDenied, match=re.escape(message)):
        policy.check(spec)


def test_policy_allows_what_no_rule_refuses() -> None:
    CommandPolicy(allowed=("ls", "ec*"), blocked=("rm",)).check(CommandSpec("/bin/echo", ["x"]))
    CommandPolicy(allowed=("sh",)).check(CommandSpec("echo hi", shell=True))
    CommandPolicy().check(CommandSpec("anything"))
    CommandPolicy(allowed=("/opt/tools/*",)).check(CommandSpec("/opt/tools/build"))
    CommandPolicy(allowed=("ls",)).check(CommandSpec("ls", env={"COLUMNS": "80", "LANG": "C"}))
    CommandPolicy(allowed=("make",), allowed_env=("BUILD_*",)).check(
        CommandSpec("make", env={"BUILD_ID": "7", "LC_ALL": "C"})
    )
    CommandPolicy(blocked=("rm",)).check(CommandSpec("echo rm; ls > rm", shell=True))
    CommandPolicy(blocked=("rm",)).check(CommandSpec("ls", env={"PATH": "/opt/bin"}))


def test_executor_validation_applies_its_policy() -> None:
    executor = CommandExecutor({"blocked_commands": "rm, shutdown"})
    executor.validate(CommandSpec("ls").to_payload())
    with pytest.raises(PolicyDenied, match="'shutdown'"):
        executor.validate(CommandSpec("shutdown", ["-h", "now"]).to_payload())


def spec(priority: int) -> TaskSpec:
    return TaskSpec("command", b"{}", 1.0, priority)


def test_aging_lets_a_low_priority_job_through_a_stream_of_high_ones() -> None:
    scheduler = Scheduler(RoundRobinBalancer(), aging_s=10.0)
    scheduler.enqueue(JobId("low"), 1, spec(0), now=0.0)
    seq = 2
    for t in range(0, 200, 5):  # a priority-10 job every 5 s, forever
        scheduler.enqueue(JobId(f"high{t}"), seq, spec(10), now=float(t))
        seq += 1
        scheduler.age(float(t))
        if scheduler.ordered()[0] == "low":
            # Bound: 10 levels x 10 s, then it is the oldest among equals.
            assert t == 100
            return
        scheduler.remove(scheduler.ordered()[0])  # one job runs
    pytest.fail("the low-priority job starved")


def test_without_aging_priorities_are_strict_and_ahead_counts() -> None:
    scheduler = Scheduler(RoundRobinBalancer())
    scheduler.enqueue(JobId("a"), 1, spec(1))
    scheduler.enqueue(JobId("b"), 2, spec(5))
    scheduler.enqueue(JobId("c"), 3, spec(5))
    assert scheduler.age(10_000.0) == 0
    assert scheduler.ordered() == ["b", "c", "a"]
    assert scheduler.ahead_of(JobId("a")) == 2
    assert scheduler.ahead_of(JobId("c")) == 1
    assert scheduler.ahead_of(JobId("nope")) == 0
