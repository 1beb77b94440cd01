// CUDA launcher of MVGather (specification: fluxshard/sparse/spec.py). Shared by the TensorRT
// plugin and the standalone self-test; plain C types so both sides stay simple.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace fluxshard
{

// gathered[nc, p] = invalid[p] ? 0 : cache[nc, index[p]] for nc < planes (N * C), p < positions
// (H * W); an index outside [0, positions) reads 0 (the spec clamps; a hostile index must not
// read out of bounds).
cudaError_t launchMvGather(float const* cache, int64_t const* index, bool const* invalid,
    float* gathered, int64_t planes, int64_t positions, cudaStream_t stream);

} // namespace fluxshard
