"""dist-exec: distributed command execution over gRPC."""

import os

from dist_exec.tuning import OWN_SETTINGS

__version__ = "0.1.0"

# A worker forks to start commands as another user or under limits while gRPC's threads run,
# and gRPC's fork handlers then now and then crash the child or the parent's poller. Nothing in
# dist-exec uses gRPC in a forked child; the setting must be made before gRPC is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", OWN_SETTINGS["GRPC_ENABLE_FORK_SUPPORT"])
