"""Tensor exchange for python-backend models (import only inside Triton's python backend).

Tensors cross the backend boundary through DLPack only. The stub's ``as_numpy`` and
``Tensor(name, ndarray)`` read numpy 1's descriptor layout and return wrong or empty data under
numpy 2; ``Tensor.from_dlpack`` on a numpy array works but logs a capsule-name error per call, so
outputs go through torch. numpy 2 gives empty arrays zero strides, which the backend refuses as
"not contiguous": empty outputs are made fresh.
"""

from __future__ import annotations

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


def input_array(request, name: str) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"missing input {name}")
    return np.from_dlpack(tensor)


def output_tensor(name: str, array: np.ndarray):
    array = np.ascontiguousarray(array)
    data = torch.from_numpy(array) if array.size else torch.zeros(
        array.shape, dtype=torch.from_numpy(np.zeros(1, array.dtype)).dtype)
    return pb_utils.Tensor.from_dlpack(name, data)


def error_response(message: str, code_name: str = "INTERNAL"):
    code = getattr(pb_utils.TritonError, code_name, None)
    err = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)
