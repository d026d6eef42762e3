"""The dist-exec command line: servers (master, worker, up, down) and client commands.

Exit codes: client commands exit 0 on success, 1 when dist-exec reports an error (one line on
stderr), 2 on bad usage, 3 when the master does not accept the credentials (UNAUTHENTICATED)
and 4 when the identity may not do that (PERMISSION_DENIED). ``run`` exits with the command's
own exit code, 124 when it timed out, 130 when it was cancelled, 125 when dist-exec could not
run it, and 3 or 4 as above (an HTTP job: 0, 22 for a 4xx or 5xx status, 63 for a body cut).
Ctrl-C (SIGTERM, SIGHUP) cancels the job of ``run``, which then
dies of the signal (see interrupts.py); Ctrl-C ends any other client command as it ends a local
program (killed by SIGINT: the shell shows 130).
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import click

from dist_exec import __version__
from dist_exec.cli import jobs, run, servers
from dist_exec.cli.common import fail, lost_output
from dist_exec.cli.servers import serve
from dist_exec.interrupts import die_of
from dist_exec.security.commands import certs_group, tokens_group

__all__ = ["main", "serve"]


class _Commands(click.Group):
    """dist-exec's commands. One whose output is gone ends as a local program would: killed by
    SIGPIPE when its reader exited (``dist-exec list | head -1``), by SIGHUP when its terminal
    closed; never with click's silent exit status 1 or a traceback. Any other OSError that
    reaches here is one line and exit status 1."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:  # (--help and --version of the group itself write here)
            return super().make_context(info_name, args, parent, **extra)
        except OSError as exc:
            _end_for(exc)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as exc:
            _end_for(exc)


def _end_for(exc: OSError) -> NoReturn:
    ending = lost_output(exc)
    if ending is not None:
        die_of(ending)
    fail(str(exc))


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dist-exec")
@click.pass_context
def main(ctx: click.Context) -> None:
    """dist-exec: run commands across a fleet of workers."""
    if sys.stderr is None:
        # (fd 2 closed, `2>&-`: what would be written there is dropped, as a command run
        # locally loses it; the first write to it failed with a hidden AttributeError)
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    if sys.stdout is None and ctx.invoked_subcommand not in QUIET_WITHOUT_STDOUT:
        # (Python leaves sys.stdout None when fd 1 is closed, and click then writes nothing:
        # `dist-exec status ID >&-` printed nothing and exited 0.)
        fail("standard output is closed: nothing could be written (redirect it to a file or "
             "/dev/null)")  # fmt: skip


# Servers write only their "listening on" line to stdout: they may run without it.
QUIET_WITHOUT_STDOUT = {"master", "worker"}


for command in (
    servers.master,
    servers.worker,
    servers.up,
    servers.down,
    run.run,
    jobs.status,
    jobs.list_jobs,
    jobs.logs,
    jobs.cancel,
    jobs.nodes,
    jobs.drain,
    jobs.whoami,
    certs_group,
    tokens_group,
):
    main.add_command(command)
