"""FluxShard core: shared by the edge runtime, the client SDK and the Triton model."""

__version__ = "0.1.0"
