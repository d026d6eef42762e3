"""The dist-exec Python SDK.

async with Client("127.0.0.1:50051") as client:
    job_id = await client.submit(command_spec("echo hello", shell=True))
    async for attempt, chunk in client.stream_output(job_id):
        ...
    job = await client.get(job_id)
"""

from dist_exec.client._client import Client, command_spec
from dist_exec.errors import (
    AccessDenied,
    DistExecError,
    InvalidTaskSpec,
    JobAlreadyFinished,
    JobNotFound,
    MasterTimeout,
    MasterUnavailable,
    RateLimited,
    ResourceExhausted,
    Unauthenticated,
)
from dist_exec.models import (
    Job,
    JobId,
    JobStatus,
    NodeInfo,
    OutputChunk,
    Stream,
    TaskLimits,
    TaskSpec,
)
from dist_exec.security.credentials import Credentials

__all__ = [
    "AccessDenied",
    "Client",
    "Credentials",
    "DistExecError",
    "InvalidTaskSpec",
    "Job",
    "JobAlreadyFinished",
    "JobId",
    "JobNotFound",
    "JobStatus",
    "MasterTimeout",
    "MasterUnavailable",
    "NodeInfo",
    "OutputChunk",
    "RateLimited",
    "ResourceExhausted",
    "Stream",
    "TaskLimits",
    "TaskSpec",
    "Unauthenticated",
    "command_spec",
]
