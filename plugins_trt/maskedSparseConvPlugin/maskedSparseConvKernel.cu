// One CUDA kernel per step of MaskedSparseConv; semantics in fluxshard/sparse/spec.py.
#include "cudaLaunch.cuh"
#include "maskedSparseConvKernel.h"

namespace fluxshard
{
namespace
{
// computed[p]: some recompute position lies in p's tile (tiles start at the map's origin).
__global__ void widenToTiles(bool const* recompute, bool* computed, int32_t h, int32_t w, int32_t tile)
{
    int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i >= static_cast<int64_t>(h) * w)
        return;
    int32_t y = static_cast<int32_t>(i / w), x = static_cast<int32_t>(i % w);
    int32_t y0 = y / tile * tile, x0 = x / tile * tile;
    bool any = false;
    for (int32_t ty = y0; ty < min(y0 + tile, h) && !any; ++ty)
        for (int32_t tx = x0; tx < min(x0 + tile, w) && !any; ++tx)
            any = recompute[ty * w + tx];
    computed[i] = any;
}

// fresh[co, p] = act(b[co] + sum W[co, ci, ky, kx] x[g * cin_g + ci, iy, ix]) at computed p.
__global__ void freshConv(ConvGeometry g, float const* x, bool const* computed, float const* weight,
    float const* bias, float* fresh)
{
    int64_t positions = static_cast<int64_t>(g.hout) * g.wout;
    int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i >= positions * g.cout)
        return;
    int64_t p = i % positions;
    if (!computed[p])
        return;
    int32_t co = static_cast<int32_t>(i / positions);
    int32_t oy = static_cast<int32_t>(p / g.wout), ox = static_cast<int32_t>(p % g.wout);
    int32_t cinGroup = g.cin / g.group, coutGroup = g.cout / g.group;
    int32_t firstIn = (co / coutGroup) * cinGroup;
    float sum = bias[co];
    for (int32_t ci = 0; ci < cinGroup; ++ci)
    {
        float const* plane = x + static_cast<int64_t>(firstIn + ci) * g.hin * g.win;
        float const* w = weight + (static_cast<int64_t>(co) * cinGroup + ci) * g.kernel * g.kernel;
        for (int32_t ky = 0; ky < g.kernel; ++ky)
        {
            int32_t iy = oy * g.stride - g.padTop + ky;
            if (iy < 0 || iy >= g.hin)
                continue; // zero padding
            for (int32_t kx = 0; kx < g.kernel; ++kx)
            {
                int32_t ix = ox * g.stride - g.padLeft + kx;
                if (ix >= 0 && ix < g.win)
                    sum += w[ky * g.kernel + kx] * plane[iy * g.win + ix];
            }
        }
    }
    fresh[i] = g.silu ? sum / (1.0F + expf(-sum)) : sum;
}

// Truncation and assembly per position: changed where computed and (max_c |fresh - gathered| >
// threshold or invalid); y = fresh there, the gathered cache elsewhere.
__global__ void assemble(ConvGeometry g, bool const* computed, float const* fresh,
    float const* gathered, bool const* invalid, float* y, bool* changed)
{
    int64_t positions = static_cast<int64_t>(g.hout) * g.wout;
    int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (p >= positions)
        return;
    bool take = false;
    if (computed[p])
    {
        take = invalid[p];
        for (int32_t c = 0; c < g.cout && !take; ++c)
            take = fabsf(fresh[c * positions + p] - gathered[c * positions + p]) > g.threshold;
    }
    changed[p] = take;
    float const* source = take ? fresh : gathered;
    for (int32_t c = 0; c < g.cout; ++c)
        y[c * positions + p] = source[c * positions + p];
}

inline size_t aligned(size_t bytes)
{
    return (bytes + 255) / 256 * 256;
}
} // namespace

size_t maskedSparseConvWorkspace(ConvGeometry const& g)
{
    size_t positions = static_cast<size_t>(g.hout) * g.wout;
    return aligned(positions * sizeof(bool)) + aligned(positions * g.cout * sizeof(float));
}

cudaError_t launchMaskedSparseConv(ConvGeometry const& g, float const* x, bool const* recompute,
    float const* gathered, bool const* invalid, float const* weight, float const* bias, float* y,
    bool* changed, void* workspace, cudaStream_t stream)
{
    int64_t positions = static_cast<int64_t>(g.hout) * g.wout;
    if (positions == 0)
        return cudaSuccess;
    auto* computed = static_cast<bool*>(workspace);
    auto* fresh = reinterpret_cast<float*>(static_cast<char*>(workspace) + aligned(positions * sizeof(bool)));
    int32_t tile = g.tile > 1 ? g.tile : 1;
    widenToTiles<<<blocksFor(positions), kThreads, 0, stream>>>(recompute, computed, g.hout, g.wout, tile);
    freshConv<<<blocksFor(positions * g.cout), kThreads, 0, stream>>>(g, x, computed, weight, bias, fresh);
    assemble<<<blocksFor(positions), kThreads, 0, stream>>>(g, computed, fresh, gathered, invalid, y, changed);
    return cudaGetLastError();
}

} // namespace fluxshard
