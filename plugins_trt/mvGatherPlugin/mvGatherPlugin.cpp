// MVGather: a layer's cache moved along the motion field (see mvGatherPlugin.h).
#include "mvGatherPlugin.h"

#include "mvGatherKernel.h"

using namespace nvinfer1;

namespace fluxshard
{

void MvGatherPlugin::outputShapes(DimsExprs const* inputs, DimsExprs* outputs) const noexcept
{
    outputs[0] = inputs[0];
}

bool MvGatherPlugin::acceptShapes(PluginTensorDesc const* in) noexcept
{
    if (in[0].dims.nbDims != 4)
        return false;
    mPlanes = int64_t{in[0].dims.d[0]} * in[0].dims.d[1];
    mPositions = int64_t{in[0].dims.d[2]} * in[0].dims.d[3];
    if (volume(in[1].dims) != mPositions || volume(in[2].dims) != mPositions)
    {
        logError(std::string(kName) + ": field_index and invalid must cover the cache's H x W positions");
        return false;
    }
    return true;
}

cudaError_t MvGatherPlugin::launch(
    void const* const* inputs, void* const* outputs, void*, cudaStream_t stream) noexcept
{
    return launchMvGather(static_cast<float const*>(inputs[0]), static_cast<int64_t const*>(inputs[1]),
        static_cast<bool const*>(inputs[2]), static_cast<float*>(outputs[0]), mPlanes, mPositions, stream);
}

REGISTER_FLUXSHARD_PLUGIN(MvGatherPlugin);

} // namespace fluxshard
