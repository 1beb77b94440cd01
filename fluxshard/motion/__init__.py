"""The motion layer: decode + codec motion vectors, validation, block matching, fields of bare
frames (estimate), field operations and the per-endpoint dispatch state (the whole path into an
endpoint, wire included: fluxshard.endpoint). Conventions: docs/CONVENTIONS.md ("Motion
fields")."""

from fluxshard.motion.decode import (MOTION_SOURCES, MotionFrame, MotionSourceError, codec_field,
                                     iter_motion)
from fluxshard.motion.estimate import FIELD_ESTIMATORS, FrameMotion
from fluxshard.motion.field import (MV_BLOCK, align_image, compose_fields, field_at_stride,
                                    motion_statistic)
from fluxshard.motion.state import EndpointState, ResidualSet, invalid_blocks, residual_blocks

__all__ = ["MV_BLOCK", "MOTION_SOURCES", "MotionFrame", "MotionSourceError", "iter_motion",
           "codec_field", "FIELD_ESTIMATORS", "FrameMotion", "align_image", "compose_fields",
           "field_at_stride", "motion_statistic",
           "EndpointState", "ResidualSet", "invalid_blocks", "residual_blocks"]
