"""FluxShard SDK: what applications import.

``FluxShardStream`` runs one camera: motion-aware residual sets per endpoint, per-frame edge/cloud
dispatch (``Dispatcher`` with profiled ``LatencyProfile`` tables and a measured uplink), the edge
in-process (``LocalEndpoint``) and the cloud over Triton (``RemoteEndpoint`` on the transport's
``Stream``). ``AsyncFluxShardStream`` is its asyncio twin. Frames may come with the codec's
motion fields or bare (any decoder's numpy frames): then the field is estimated
(``fluxshard.motion.estimate``). Results (``FrameResult``) carry class names, the frame's shape
and time, masks, and convert to supervision's ``Detections``.
"""

from .dispatch import (POLICIES, BandwidthEstimator, Decision, Dispatcher, LatencyProfile,
                       LatencyTable)
from .results import DetectionTracker, EndpointRun, FrameResult
from .stream import (AsyncFluxShardStream, AsyncRemoteEndpoint, FluxShardStream, LocalEndpoint,
                     RemoteEndpoint)
from .transport import (AsyncFluxShardClient, AsyncStream, CloudError, CloudResult, FluxShardClient,
                        RetryPolicy, Stream)
from .transport import CloudUnavailable, DeadlineMissed, auth_headers

__all__ = ["FluxShardClient", "Stream", "AsyncFluxShardClient", "AsyncStream", "CloudResult",
           "CloudError", "RetryPolicy", "FluxShardStream", "AsyncFluxShardStream", "FrameResult",
           "EndpointRun", "DetectionTracker", "LocalEndpoint", "RemoteEndpoint",
           "AsyncRemoteEndpoint", "Dispatcher", "Decision", "LatencyProfile", "LatencyTable",
           "BandwidthEstimator", "POLICIES", "CloudUnavailable", "DeadlineMissed", "auth_headers"]
