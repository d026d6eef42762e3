"""The "command" executor: runs a program, or a shell string through /bin/sh -c.

Every command runs in its own session and process group. When the command ends, is cancelled or
times out, whatever is left of its group gets SIGTERM and, after a grace period, SIGKILL, so no
child or grandchild outlives its task.

Payload (JSON, UTF-8): {"command": str, "args": [str], "shell": bool, "env": {str: str},
"working_dir": str, "stdin": str, "stdin_base64": str}. With "shell": true, "command" is a shell
string and "args" must be empty; otherwise "command" is the program and "args" its arguments (no
shell involved). The command reads the bytes of "stdin" (UTF-8) or of "stdin_base64" (for data
that is not UTF-8), at most one of them.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import functools
import json
import logging
import os
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from dist_exec import procfs
from dist_exec.errors import InvalidTaskSpec, PolicyDenied, shorten
from dist_exec.executors import ExecRequest, OutputSink, StopOrder, json_payload
from dist_exec.executors.child import Child, read_pipe, write_pipe
from dist_exec.executors.containment import POLL_S, Containment, Jail, may_enter
from dist_exec.executors.guardian import (
    GUARD_ENV,
    ProcessGuard,
    kill_left_behind,
    kill_tagged,
    settle,
    signal_outside,
)
from dist_exec.executors.limits import Exceeded, fit
from dist_exec.executors.spawner import SpawnerGone
from dist_exec.models import ExecOutcome, ExecStatus, Stream
from dist_exec.tuning import without_own_settings

log = logging.getLogger(__name__)
SHELL = "/bin/sh"
JOB_ENV, ATTEMPT_ENV = "DIST_EXEC_JOB_ID", "DIST_EXEC_ATTEMPT"  # set for every command
# And what this start of it is (a random id of its own), set for every command too: what it
# left running is found by that, not by its job and attempt, which another run of the same
# attempt (a test's, a second worker's on the host) may also have.
RUN_ENV = "DIST_EXEC_RUN"
PIPE_DRAIN_S = 2.0  # after the group is gone, how long to wait for pipes to reach EOF
# What a command sees of the worker's environment unless the worker passes all of it.
BASE_ENV_KEYS = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME", "TMPDIR")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_FIELDS = {"command", "args", "shell", "env", "working_dir", "stdin", "stdin_base64"}
STDERR_TAIL = 4096  # kept to tell an allocation or fork failure under rlimits
# What an attempt that ended on its own left running outside its process group (a `setsid`
# child) is looked for this often, SWEEPS times (one that was forking leaves a new one).
SWEEP_S = 1.0
SWEEPS = 2


@dataclass(frozen=True, slots=True)
class CommandSpec:
    command: str
    args: list[str] = field(default_factory=list)
    shell: bool = False
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""
    stdin: bytes = b""

    @property
    def argv(self) -> list[str]:
        return [SHELL, "-c", self.command] if self.shell else [self.command, *self.args]

    def to_payload(self) -> bytes:
        body: dict[str, object] = {"command": self.command}
        if self.args:
            body["args"] = self.args
        if self.shell:
            body["shell"] = True
        if self.env:
            body["env"] = self.env
        if self.working_dir:
            body["working_dir"] = self.working_dir
        if self.stdin:
            encoded = base64.b64encode(self.stdin).decode()
            try:
                text = self.stdin.decode()
            except UnicodeDecodeError:
                body["stdin_base64"] = encoded
            else:
                # Control characters are escaped in JSON (a NUL takes 6 bytes): as text or in
                # base64 (4/3 of its size), whichever is smaller as sent.
                as_text = len(json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass"))
                if as_text <= len(encoded) + 2:
                    body["stdin"] = text
                else:
                    body["stdin_base64"] = encoded
        # Not escaped to ASCII: the payload is as large as what it holds (a limit applies). A
        # lone surrogate passes as such, for parse_payload to refuse.
        return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


def parse_payload(payload: bytes) -> CommandSpec:
    """Decode and check a command payload; InvalidTaskSpec says exactly what is wrong."""
    body = json_payload(payload, "command")
    if not isinstance(body, dict):
        raise InvalidTaskSpec("command payload must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise InvalidTaskSpec(
            f"command payload has unknown field(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(_FIELDS))}"
        )
    command = _string(body, "command")
    if not command.strip():
        raise InvalidTaskSpec("command payload: 'command' must be a non-empty string")
    args = body.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise InvalidTaskSpec("command payload: 'args' must be a list of strings")
    shell = body.get("shell", False)
    if not isinstance(shell, bool):
        raise InvalidTaskSpec("command payload: 'shell' must be true or false")
    if shell and args:
        raise InvalidTaskSpec("command payload: 'args' cannot be combined with 'shell': true")
    working_dir = _string(body, "working_dir", "")
    if working_dir and not os.path.isabs(working_dir):
        raise InvalidTaskSpec(
            f"command payload: 'working_dir' must be an absolute path, got {shorten(working_dir)}"
        )
    if any("\0" in value for value in (command, *args, working_dir)):
        raise InvalidTaskSpec("command payload: command, args and working_dir cannot hold NUL")
    env = _environment_field(body.get("env", {}))
    try:
        for text in (command, *args, working_dir, *env, *env.values()):
            text.encode()
        stdin = _stdin_field(body)
    except UnicodeEncodeError:
        raise InvalidTaskSpec(
            "command payload: strings must be valid Unicode (lone surrogate)"
        ) from None
    return CommandSpec(command, list(args), shell, env, working_dir, stdin)


def _stdin_field(body: Mapping[str, object]) -> bytes:
    """Raises UnicodeEncodeError for a "stdin" with a lone surrogate."""
    if "stdin" in body and "stdin_base64" in body:
        raise InvalidTaskSpec("command payload: give 'stdin' or 'stdin_base64', not both")
    if "stdin_base64" in body:
        try:
            return base64.b64decode(_string(body, "stdin_base64"), validate=True)
        except ValueError:  # (binascii.Error too)
            raise InvalidTaskSpec("command payload: 'stdin_base64' is not valid base64") from None
    return _string(body, "stdin", "").encode()


def _environment_field(env: object) -> dict[str, str]:
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise InvalidTaskSpec("command payload: 'env' must map strings to strings")
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise InvalidTaskSpec(f"command payload: invalid environment variable {shorten(key)}")
    return dict(env)


def _string(body: Mapping[str, object], key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str):
        raise InvalidTaskSpec(f"command payload: {key!r} must be a string")
    return value


@dataclass(frozen=True, slots=True)
class CommandPolicy:
    """Which commands may run (the spec's allowed_commands / blocked_commands).

    Rules are shell-style globs. ``allowed``, when not empty, is matched against the program: a
    rule without a slash against a program named without one (found on PATH, which a job may
    not set then) or given by its path in a system directory (``/usr/bin/ls`` for ``ls``); a
    rule with a slash against the program's normalized absolute path. A shell string's program
    is ``sh``: allowing ``sh`` allows anything, so an allow-list without it admits only argv
    commands, which cannot hide another program. Under an allow-list a job may set only the
    environment variables named by ``allowed_env`` (globs) or SAFE_ENV, and never those known
    to make a program load or run other code (LD_PRELOAD, BASH_ENV, exported shell functions,
    ...). Still, an allowed program that runs others (env, xargs, find, an interpreter) allows
    them all.

    ``blocked`` is matched against the program's name, against each program a shell string
    starts by name, and against the whole command line. It stops mistakes, not a determined
    user: a copy of the program under another name, or a program that runs it, gets past it.
    """

    allowed: tuple[str, ...] = ()
    blocked: tuple[str, ...] = ()
    allowed_env: tuple[str, ...] = ()

    def check(self, spec: CommandSpec) -> None:
        if not self.allowed and not self.blocked:
            return
        program = "sh" if spec.shell else os.path.basename(spec.command)
        line = spec.command if spec.shell else shlex.join([spec.command, *spec.args])
        names = [program, *sorted(_started_programs(spec.command) if spec.shell else ())]
        for rule in self.blocked:
            hit = next((n for n in names if fnmatch.fnmatchcase(n, rule)), None)
            if hit is not None or fnmatch.fnmatchcase(line, rule):
                raise PolicyDenied(f"command {shorten(hit or program)} is blocked by rule {rule!r}")
        if not self.allowed:
            return
        if not any(_allows(rule, spec) for rule in self.allowed):
            named = program if spec.shell or "/" not in spec.command else spec.command
            raise PolicyDenied(
                f"command {shorten(named)} is not in the allowed commands "
                f"({', '.join(self.allowed)})"
            )
        for name in spec.env:
            if _runs_code(name):
                raise PolicyDenied(
                    f"environment variable {shorten(name)} may not be set under an allow-list "
                    "of commands: it can make an allowed program load or run other code"
                )
            if not any(fnmatch.fnmatchcase(name, rule) for rule in SAFE_ENV + self.allowed_env):
                raise PolicyDenied(
                    f"environment variable {shorten(name)} is not in the allowed environment "
                    f"({', '.join(SAFE_ENV + self.allowed_env)}); the worker's --allow-env "
                    "adds names"
                )


SYSTEM_DIRS = frozenset(DEFAULT_PATH.split(":"))
# What a job may always set under an allow-list of commands (--allow-env adds to it).
SAFE_ENV = ("LANG", "LC_*", "TZ", "TERM", "COLUMNS", "LINES", "NO_COLOR")
SHELL_KEYWORDS = frozenset({"if", "then", "else", "elif", "while", "until", "do", "!", "{", "time"})
# Environment variables that make a program (the dynamic loader, a shell, an interpreter, a
# pager or editor it starts, a library it loads) load or run code the job names: glibc's list
# of those it ignores for setuid programs, the shells', the common interpreters', pagers' and
# editors', and the ones that move where a program reads its rc files (HOME, XDG_*). Exported
# bash functions are BASH_FUNC_name%%. A denylist: an allowed program may know others.
CODE_ENV = frozenset(
    {
        *("PATH", "GCONV_PATH", "GETCONF_DIR", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH"),
        *("MALLOC_TRACE", "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TMPDIR"),
        *("TZDIR", "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "IFS", "CDPATH"),
        *("PERL5LIB", "PERL5OPT", "PERLLIB", "RUBYLIB", "RUBYOPT", "NODE_OPTIONS", "NODE_PATH"),
        *("JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS"),
        *("LESSOPEN", "LESSCLOSE", "LESSKEY", "PAGER", "MANPAGER", "EDITOR", "VISUAL"),
        *("OPENSSL_CONF", "OPENSSL_ENGINES", "OPENSSL_MODULES", "HOME", "ZDOTDIR", "INPUTRC"),
        *("SSH_ASKPASS", "SUDO_ASKPASS", "BROWSER", "SHELL", "TERMINFO", "TERMINFO_DIRS"),
    }
)
CODE_ENV_PREFIXES = ("LD_", "BASH_FUNC_", "PYTHON", "GIT_", "LUA_", "XDG_", "PERL", "RUBY")


def _runs_code(name: str) -> bool:
    return name in CODE_ENV or name.startswith(CODE_ENV_PREFIXES) or "%" in name


def _allows(rule: str, spec: CommandSpec) -> bool:
    if spec.shell:
        return fnmatch.fnmatchcase("sh", rule)
    command = spec.command
    if "/" not in command:
        return "/" not in rule and fnmatch.fnmatchcase(command, rule)
    if not command.startswith("/"):
        return False  # relative to a working directory: any program at all
    path = os.path.normpath(command)
    if "/" in rule:
        return fnmatch.fnmatchcase(path, rule)
    return os.path.dirname(path) in SYSTEM_DIRS and fnmatch.fnmatchcase(
        os.path.basename(path), rule
    )


def _assignment(word: str) -> bool:
    name, equals, _ = word.partition("=")
    return bool(equals) and name.isidentifier()


def _started_programs(line: str) -> set[str]:
    """The names of the programs a shell string starts plainly (each simple command's first
    word, by its base name); best effort: the shell's expansions can hide others."""
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        words = list(lexer)
    except ValueError:  # unbalanced quotes: the shell refuses it too
        return set()
    found = set()
    at_start = True
    for word in words:
        if word and all(c in "();<>|&" for c in word):
            at_start = word not in ("<", ">", ">>", "<<", ">&", "<&")
        elif at_start and word in SHELL_KEYWORDS:
            continue  # a command follows
        elif at_start and word not in ("fi", "done", "esac", "}") and not _assignment(word):
            found.add(os.path.basename(word))
            at_start = False
    return found


def _rules(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(r.strip() for r in value.split(",") if r.strip())
    if isinstance(value, list | tuple) and all(isinstance(r, str) for r in value):
        return tuple(value)
    raise ValueError(f"command rules must be strings, got {value!r}")


def describe(payload: bytes) -> str:
    """One line for listings: the command as a person would type it."""
    try:
        spec = parse_payload(payload)
    except InvalidTaskSpec:
        return "<invalid payload>"
    if spec.shell:
        return spec.command
    return " ".join([spec.command, *spec.args])


class CommandExecutor:
    """Runs commands as local processes, one process group each."""

    name = "command"

    def __init__(self, options: Mapping[str, object] | None = None) -> None:
        opts = options or {}
        self.kill_grace_s = float(str(opts.get("kill_grace_s", 5.0)))
        self.inherit_env = bool(opts.get("inherit_env", False))
        self.policy = CommandPolicy(
            _rules(opts.get("allowed_commands")),
            _rules(opts.get("blocked_commands")),
            _rules(opts.get("allowed_env")),
        )
        guard = opts.get("process_guard")  # kills running groups if the worker dies
        self.guard = guard if isinstance(guard, ProcessGuard) else None
        containment = opts.get("containment")
        self.containment = containment if isinstance(containment, Containment) else Containment()
        # The payload validated last and what it parsed to: the worker validates a task's
        # payload just before it executes it, and need not parse it twice.
        self._validated: tuple[bytes, CommandSpec] | None = None
        self._sweeper = _Sweeper()

    def validate(self, payload: bytes) -> None:
        spec = parse_payload(payload)
        self.policy.check(spec)
        self._validated = (payload, spec)

    def _parsed(self, payload: bytes) -> CommandSpec:
        validated, self._validated = self._validated, None
        if validated is not None and validated[0] is payload:
            return validated[1]
        return parse_payload(payload)

    async def health_check(self) -> bool:
        proc = await asyncio.create_subprocess_exec("true")
        return await proc.wait() == 0

    def _environment(self, spec: CommandSpec, request: ExecRequest, run: str) -> dict[str, str]:
        if self.inherit_env:
            env = without_own_settings(dict(os.environ))
        else:
            env = {k: os.environ[k] for k in BASE_ENV_KEYS if k in os.environ}
            # Another user gets the standard PATH: the worker's may name directories that user
            # cannot search (root's own), and a missing command would look like a permission
            # problem.
            another_user = self.containment.run_as or self.containment.pool
            if another_user is not None or "PATH" not in env:
                env["PATH"] = DEFAULT_PATH
        env.update(spec.env)
        if self.policy.allowed:
            # An allowed name means the program of that name on the standard PATH (its check
            # says so), never one in a directory of the worker's own PATH a job could write.
            env["PATH"] = DEFAULT_PATH
        # Which job and attempt this is: for the command, and to find its processes that left
        # its process group when it must be stopped.
        env[JOB_ENV], env[ATTEMPT_ENV] = request.task_id, str(request.attempt)
        env[RUN_ENV] = run
        if self.guard is not None:
            env[GUARD_ENV] = self.guard.token
        return env

    async def execute(self, request: ExecRequest, sink: OutputSink) -> ExecOutcome:
        spec = self._parsed(request.payload)
        self.policy.check(spec)  # here too: a forged request must not get past it
        limits = fit(request.limits, self.containment.limits)
        run = uuid.uuid4().hex
        try:
            jail = self.containment.jail(f"task-{run}", limits)
        except OSError as exc:
            return ExecOutcome(ExecStatus.FAILURE, error=f"cannot set up the task's limits: {exc}")
        try:
            return await self._run(spec, request, jail, sink, run)
        finally:
            if jail.needs_close:
                # Also kills whatever of the task left its process group but not its cgroup,
                # or its uid of the pool.
                await asyncio.shield(asyncio.to_thread(jail.close))

    async def _spawn(
        self, spec: CommandSpec, request: ExecRequest, jail: Jail, run: str
    ) -> Child | ExecOutcome:
        """The started process, or why it could not start."""
        env = jail.environment(self._environment(spec, request, run))
        # Another user starts in its home (as HOME says), whichever way it is started; the
        # worker's own directory may be one that user cannot enter, or can write.
        cwd = spec.working_dir or (jail.run_as.home if jail.run_as is not None else None)
        refused = await _refused_working_dir(spec, jail)
        if refused is not None:
            return refused
        try:
            child = await _start(spec, jail, cwd, env)
        except SpawnerGone as exc:
            # It may have started the command: nothing of this attempt may run on unseen (a
            # command still in its exec has no tags yet: looked for until none shows up).
            await asyncio.to_thread(settle, _tags(request))
            return ExecOutcome(ExecStatus.FAILURE, error=f"cannot run {spec.argv[0]}: {exc}")
        except (OSError, subprocess.SubprocessError) as exc:
            return await _start_failure(exc, spec, jail, cwd)
        if self.guard is not None:
            self.guard.watch(child.pid)  # its own session: the group id is its pid
        return child

    async def _run(
        self, spec: CommandSpec, request: ExecRequest, jail: Jail, sink: OutputSink, run: str
    ) -> ExecOutcome:
        started = time.monotonic()
        proc = await self._spawn(spec, request, jail, run)
        if isinstance(proc, ExecOutcome):
            return proc
        tail = _StderrTail(sink)
        pumps = [
            asyncio.create_task(
                read_pipe(proc.stdout, functools.partial(sink.write, Stream.STDOUT))
            ),
            asyncio.create_task(
                read_pipe(proc.stderr, functools.partial(tail.write, Stream.STDERR))
            ),
        ]
        if proc.stdin is not None:
            pumps.append(asyncio.create_task(write_pipe(proc.stdin, spec.stdin)))
        watch = asyncio.create_task(_watch(jail, proc.pid, tail)) if jail.watched else None
        exited = asyncio.create_task(proc.wait()) if watch is not None else None
        exceeded: Exceeded | None = None
        try:
            if watch is None:
                await proc.wait()
            else:
                assert exited is not None
                await asyncio.wait({exited, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch is not None and watch.done():
                exceeded = watch.result()
                _signal_group(proc.pid, signal.SIGKILL)
                jail.kill_all()
                await proc.wait()
        except asyncio.CancelledError:
            # Stopped (cancel, timeout, drain): leftovers outside the group go too.
            await asyncio.shield(self._stop(proc, pumps, request))
            raise
        finally:
            for task in (exited, watch):
                if task is not None:
                    task.cancel()
        # The main process is gone; anything it left behind in its group goes too, and soon
        # (see _Sweeper) what it left outside the group.
        await self._after_exit(proc, pumps, request)
        self._sweeper.add(run, jail.run_as.uid if jail.run_as else os.geteuid())
        returncode = proc.returncode
        assert returncode is not None
        if proc.status_lost:
            return ExecOutcome(
                ExecStatus.FAILURE,
                error="its exit status was lost (the worker's command spawner ended while it "
                "ran); what was left of it was stopped",
                duration_s=time.monotonic() - started,
            )
        exit_code = returncode if returncode >= 0 else 128 - returncode
        duration_s = time.monotonic() - started
        if exceeded is None:  # also on success: a limit reached ends the task as failed
            exceeded = jail.verdict(returncode, bytes(tail.tail))
        if exceeded is not None:
            return _limit_outcome(exceeded, exit_code, duration_s)
        return ExecOutcome(
            ExecStatus.SUCCESS if exit_code == 0 else ExecStatus.FAILURE,
            exit_code,
            "" if exit_code == 0 else _exit_message(returncode),
            duration_s=duration_s,
        )

    async def _after_exit(
        self, proc: Child, pumps: list[asyncio.Task[None]], request: ExecRequest
    ) -> None:
        """``_stop`` once the command has ended by itself. Its result stands, whatever stops
        the attempt meanwhile (a cancel, its timeout, a drain: they used to discard it, and
        cut the cleanup short, leaving a group that ignores TERM alive): a stop now only ends
        the grace at once and kills what left the group too."""
        cleanup = asyncio.ensure_future(self._stop(proc, pumps))
        waited: asyncio.Future[None] = cleanup
        while not waited.done():
            try:
                await asyncio.shield(waited)
            except asyncio.CancelledError:
                if waited.cancelled():
                    raise
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                if waited is cleanup:
                    waited = asyncio.ensure_future(self._hurry(proc, cleanup, request))
        waited.result()

    async def _hurry(
        self, proc: Child, cleanup: asyncio.Future[None], request: ExecRequest
    ) -> None:
        _signal_group(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(kill_tagged, _tags(request))
        await cleanup

    async def _stop(
        self,
        proc: Child,
        pumps: list[asyncio.Task[None]],
        stopped: ExecRequest | None = None,
    ) -> None:
        """TERM the whole group (or the signal a cancel asked for), KILL it after the grace
        period, reap, then drain the pipes. ``stopped``: the attempt was stopped before its
        end, so its processes that left the group (setsid) are found by their environment and
        killed too."""
        if stopped is not None:
            await asyncio.to_thread(signal_outside, _tags(stopped), proc.pid, stopped.stop.signal)
        await terminate_group(proc, self.kill_grace_s, stopped.stop if stopped else None)
        if stopped is not None:
            await asyncio.to_thread(kill_tagged, _tags(stopped))
        if self.guard is not None:
            self.guard.unwatch(proc.pid)
        try:
            async with asyncio.timeout(PIPE_DRAIN_S):
                await asyncio.gather(*pumps)
        except Exception:
            # Timed out: a process that left the group (setsid) still holds a pipe. Or a sink
            # failed. Either way, stop them all (a failed gather leaves the others running).
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)


class _Sweeper:
    """Kills what starts of commands that ended on their own left running outside their
    process group (a `setsid` child; a stopped attempt's are killed at once, see ``_stop``):
    found by their RUN_ENV, in one pass over /proc a SWEEP_S for all the starts that ended
    meanwhile, not a pass each (it costs about 20 us a process)."""

    def __init__(self) -> None:
        self._due: dict[str, tuple[int, int]] = {}  # RUN_ENV -> (its uid, sweeps left)
        self._task: asyncio.Task[None] | None = None

    def add(self, run: str, uid: int) -> None:
        self._due[run] = (uid, SWEEPS)
        if self._task is None:
            self._task = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        try:
            while self._due:
                await asyncio.sleep(SWEEP_S)
                due, self._due = self._due, {}
                runs = [{RUN_ENV: run} for run in due]
                uids = {uid for uid, _ in due.values()}
                try:
                    await asyncio.to_thread(kill_left_behind, runs, uids)
                except Exception:  # (a pass that failed is not retried: the next one comes)
                    log.exception("cannot look for what ended commands left running")
                for run, (uid, sweeps) in due.items():
                    if sweeps > 1:
                        self._due.setdefault(run, (uid, sweeps - 1))
        finally:
            self._task = None


async def _start_failure(
    exc: OSError | subprocess.SubprocessError, spec: CommandSpec, jail: Jail, cwd: str | None
) -> ExecOutcome:
    """Why the command could not start, as its outcome."""
    program, working_dir = spec.argv[0], spec.working_dir

    async def not_a_directory() -> bool:
        return bool(working_dir) and not await asyncio.to_thread(os.path.isdir, working_dir)

    if isinstance(exc, FileNotFoundError):
        if await not_a_directory():
            return ExecOutcome(
                ExecStatus.FAILURE, error=f"working directory {working_dir} does not exist"
            )
        missing = await asyncio.to_thread(_missing_part, program, cwd)
        return ExecOutcome(ExecStatus.FAILURE, 127, missing or f"command not found: {program}")
    if isinstance(exc, NotADirectoryError):
        if await not_a_directory():
            return ExecOutcome(
                ExecStatus.FAILURE, error=f"working directory {working_dir} is not a directory"
            )
        return ExecOutcome(ExecStatus.FAILURE, 126, f"cannot run {program}: {exc}")
    if isinstance(exc, PermissionError):
        if working_dir and exc.filename == cwd:
            return ExecOutcome(
                ExecStatus.FAILURE, error=f"cannot enter working directory {cwd}: permission denied"
            )
        return ExecOutcome(ExecStatus.FAILURE, 126, f"permission denied: {program}")
    if isinstance(exc, OSError):
        exceeded = jail.spawn_failure(exc)
        if exceeded is not None:
            return _limit_outcome(exceeded, None, 0.0)
        return ExecOutcome(ExecStatus.FAILURE, 126, f"cannot run {program}: {exc}")
    # The pre-exec step (cgroup, rlimits, user; and under another user, the directory).
    what = "the task's limits"
    if jail.run_as is not None and working_dir:
        if await not_a_directory():
            return ExecOutcome(
                ExecStatus.FAILURE,
                error=f"working directory {working_dir} does not exist or is not a directory",
            )
        what += f" or enter working directory {cwd}"
    return ExecOutcome(ExecStatus.FAILURE, error=f"cannot apply {what}: {exc}")


def _missing_part(program: str, cwd: str | None) -> str | None:
    """Why a program that exists could not be found when it was run (ENOENT): its script's
    interpreter, or the loader or a library it names, is missing. None: the program is."""
    if "/" not in program:  # (looked up in the command's PATH, which may not be this one's)
        return None
    path = os.path.join(cwd or ".", program)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as file:
            first = file.readline(256)
    except OSError:
        return None
    if first.startswith(b"#!"):  # (the command's user could exec it: ENOENT, not EACCES)
        named = first[2:].split()
        if named:
            interpreter = shorten(named[0].decode(errors="replace"))
            return f"cannot run {program}: its interpreter {interpreter} was not found"
    return f"cannot run {program}: a file it needs was not found (its loader or a library)"


async def _refused_working_dir(spec: CommandSpec, jail: Jail) -> ExecOutcome | None:
    """The refusal of a working directory the command's user may not enter, when the worker
    forks the command itself: its child enters it as the user (see Jail.spawn_options), and a
    refusal there would only say that its pre-exec step failed. Told here, by the modes of the
    directories. (The spawner enters it as the user and says why it could not.)"""
    run_as, path = jail.run_as, spec.working_dir
    if run_as is None or jail.spawner is not None or not path:
        return None
    if await asyncio.to_thread(may_enter, path, run_as.uid, run_as.gid):
        return None
    return ExecOutcome(
        ExecStatus.FAILURE, error=f"cannot enter working directory {path}: permission denied"
    )


async def _start(spec: CommandSpec, jail: Jail, cwd: str | None, env: dict[str, str]) -> Child:
    """Through the jail's spawner if it has one, else (or if the spawner turns out to have
    ended before it was asked) by the worker itself."""
    spawner = jail.spawner
    if spawner is not None:
        try:
            # A uid of its own (--run-as-pool): the spawner starts it as that uid (and gid).
            uid = jail.run_as.uid if jail.pool is not None and jail.run_as is not None else None
            return await spawner.spawn(spec.argv, stdin=bool(spec.stdin), cwd=cwd, env=env, uid=uid)
        except SpawnerGone as exc:
            if exc.sent:
                raise  # (its end was logged: the worker forks commands until a new one runs)
    start_in, options = jail.spawn_options(cwd)
    return Child.spawn(spec.argv, stdin=bool(spec.stdin), cwd=start_in, env=env, **options)


def _tags(request: ExecRequest) -> dict[str, str]:
    """What every process of this attempt has in its environment."""
    return {JOB_ENV: request.task_id, ATTEMPT_ENV: str(request.attempt)}


def _limit_outcome(exceeded: Exceeded, exit_code: int | None, duration_s: float) -> ExecOutcome:
    return ExecOutcome(
        ExecStatus.FAILURE,
        exit_code,
        exceeded.message,
        duration_s=duration_s,
        metadata=exceeded.metadata,
    )


async def _watch(jail: Jail, session: int, tail: _StderrTail) -> Exceeded:
    """Until the task reaches a limit that the kernel only counts (CPU time of the whole tree, a
    refused fork, an OOM kill of one of its processes): then the task is killed."""
    while True:
        await asyncio.sleep(POLL_S)
        exceeded = await asyncio.to_thread(jail.exceeded_now, session, bytes(tail.tail))
        if exceeded is not None:
            return exceeded


class _StderrTail:
    """Passes output on, keeping the last bytes of stderr."""

    def __init__(self, sink: OutputSink) -> None:
        self.sink = sink
        self.tail = bytearray()

    async def write(self, stream: Stream, data: bytes) -> None:
        self.tail += data
        del self.tail[:-STDERR_TAIL]
        await self.sink.write(stream, data)


async def terminate_group(proc: Child, grace_s: float, order: StopOrder | None = None) -> None:
    """Signal the whole group (``order``'s signal, else TERM), KILL it after ``grace_s``,
    reap. A signal the order changes to meanwhile is sent as well (a further cancel)."""
    pgid = proc.pid
    sent = order.signal if order is not None else signal.SIGTERM
    if not _signal_group(pgid, sent):
        await proc.wait()
        return
    _signal_group(pgid, signal.SIGCONT)  # (a stopped process takes its signal once woken)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc.returncode is not None and not _group_alive(pgid):
            break
        if order is not None and order.signal != sent:
            sent = order.signal
            _signal_group(pgid, sent)
        await asyncio.sleep(0.02)
    else:
        _signal_group(pgid, signal.SIGKILL)
    await proc.wait()


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs. Zombies do not count: they hold nothing,
    and an orphan's zombie waits for init (or a subreaper) to reap it, which can take a while."""
    if not _signal_group(pgid, 0):
        return False
    if not procfs.PROC.is_dir():
        return True
    for pid in procfs.pids():
        fields = procfs.live(pid)
        if fields is not None and int(fields[2]) == pgid:
            return True
    return False


def _exit_message(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"command was killed by {name}"
    return f"command exited with status {returncode}"
