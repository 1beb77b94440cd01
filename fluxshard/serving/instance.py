"""Where a Triton model instance runs, from what Triton tells the python backend.

Triton passes each instance its group's kind and device id in ``initialize``'s ``args``
(``model_instance_kind``: "CPU" or "GPU"; ``model_instance_device_id``: the GPU's index). The
instance group is the one place a config says where the model runs: Triton places and counts
instances by it, so a second setting (a ``device`` parameter) could only disagree with it.
"""

from __future__ import annotations

# model_instance_kind as Triton passes it (TRITONSERVER_InstanceGroupKindString without
# "KIND_"); the config's own spelling is accepted too
_KINDS = {"CPU": "cpu", "KIND_CPU": "cpu", "GPU": "cuda", "KIND_GPU": "cuda"}


def instance_device(args: dict, params: dict | None = None) -> str:
    """The torch device of the instance ``args`` describes: "cpu" for a CPU instance, "cuda:<id>"
    for a GPU instance. Refuses other kinds, and a ``device`` model parameter (a config from
    before the instance group decided this)."""
    if params and "device" in params:
        raise ValueError(f"model parameter device={params['device']!r} is no longer read: the "
                         "instance_group kind decides (KIND_CPU: cpu, KIND_GPU with gpus [i]: "
                         "cuda:i); remove the parameter")
    kind = str(args.get("model_instance_kind", "CPU")).upper()
    if kind not in _KINDS:
        raise ValueError(f"instance kind {kind!r} is not supported: use KIND_CPU or KIND_GPU")
    if _KINDS[kind] == "cpu":
        return "cpu"
    device_id = str(args.get("model_instance_device_id", "0"))
    if not device_id.isdigit():
        raise ValueError(f"GPU instance with device id {device_id!r}: expected a GPU index")
    return f"cuda:{int(device_id)}"
