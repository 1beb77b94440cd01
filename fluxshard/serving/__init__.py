"""Cloud serving: the Triton launcher, the receive layer and per-stream sessions.

Submodules are imported on use; ``receive`` is light (numpy only) so the edge client can share it.
"""
