// CUDA launcher of MaskedSparseConv (specification: fluxshard/sparse/spec.py). Shared by the
// TensorRT plugin and the standalone self-test; plain C types so both sides stay simple.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace fluxshard
{

struct ConvGeometry
{
    int32_t cin, hin, win;   // input (batch 1)
    int32_t cout, hout, wout;
    int32_t kernel, stride, padTop, padLeft, group;
    int32_t silu;            // 1: SiLU after the conv, 0: none
    float threshold;         // truncation: tau / ||W||_1, 0 = exact
    int32_t tile;            // computed = recompute widened to tile x tile tiles; 0 or 1: per position
};

// Bytes of scratch launchMaskedSparseConv needs for this geometry.
size_t maskedSparseConvWorkspace(ConvGeometry const& g);

// y, changed = MaskedSparseConv(x, recompute, gathered, invalid, W, b) (see the spec).
cudaError_t launchMaskedSparseConv(ConvGeometry const& g, float const* x, bool const* recompute,
    float const* gathered, bool const* invalid, float const* weight, float const* bias, float* y,
    bool* changed, void* workspace, cudaStream_t stream);

} // namespace fluxshard
