"""dist-exec: distributed command execution over gRPC."""

__version__ = "0.1.0"
