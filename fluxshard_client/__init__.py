"""FluxShard SDK: what applications import.

The transport to the cloud model is here now (``FluxShardClient`` / ``Stream``); the edge/cloud
dispatch and motion extraction build on it.
"""

from .transport import (AsyncFluxShardClient, AsyncStream, CloudError, CloudResult, FluxShardClient,
                        RetryPolicy, Stream)

__all__ = ["FluxShardClient", "Stream", "AsyncFluxShardClient", "AsyncStream", "CloudResult",
           "CloudError", "RetryPolicy"]
