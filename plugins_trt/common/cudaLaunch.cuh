// Launch shape shared by the plugins' kernels: one thread per element, 256 a block.
#pragma once

#include <cstdint>

namespace fluxshard
{

constexpr int kThreads = 256;

inline unsigned blocksFor(int64_t n)
{
    return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}

} // namespace fluxshard
