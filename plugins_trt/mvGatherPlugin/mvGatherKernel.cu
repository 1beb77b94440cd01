// MVGather's kernel; semantics in fluxshard/sparse/spec.py.
#include "cudaLaunch.cuh"
#include "mvGatherKernel.h"

namespace fluxshard
{
namespace
{
__global__ void mvGatherKernel(float const* cache, int64_t const* index, bool const* invalid,
    float* gathered, int64_t planes, int64_t positions)
{
    int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i >= planes * positions)
        return;
    int64_t p = i % positions;
    int64_t plane = i / positions;
    int64_t source = index[p];
    bool readable = !invalid[p] && source >= 0 && source < positions;
    gathered[i] = readable ? cache[plane * positions + source] : 0.0F;
}
} // namespace

cudaError_t launchMvGather(float const* cache, int64_t const* index, bool const* invalid,
    float* gathered, int64_t planes, int64_t positions, cudaStream_t stream)
{
    if (planes * positions == 0)
        return cudaSuccess;
    mvGatherKernel<<<blocksFor(planes * positions), kThreads, 0, stream>>>(
        cache, index, invalid, gathered, planes, positions);
    return cudaGetLastError();
}

} // namespace fluxshard
