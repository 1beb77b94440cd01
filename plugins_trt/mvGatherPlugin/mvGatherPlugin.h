// MVGather as a TensorRT IPluginV3 (spec: fluxshard/sparse/spec.py; README.md here).
// inputs: cache float (N, C, H, W), field_index int64 (H*W), invalid bool (H, W);
// output: gathered float, shaped like cache. No attributes.
#pragma once

#include "pluginBase.h"

namespace fluxshard
{

class MvGatherPlugin final : public PluginV3Base<MvGatherPlugin>
{
public:
    static constexpr char const* kName = "MVGather";
    static constexpr char const* kVersion = "1";
    static constexpr nvinfer1::DataType kInputTypes[]
        = {nvinfer1::DataType::kFLOAT, nvinfer1::DataType::kINT64, nvinfer1::DataType::kBOOL};
    static constexpr nvinfer1::DataType kOutputTypes[] = {nvinfer1::DataType::kFLOAT};

    using PluginV3Base::PluginV3Base;

    void outputShapes(nvinfer1::DimsExprs const* inputs, nvinfer1::DimsExprs* outputs) const noexcept;
    bool acceptShapes(nvinfer1::PluginTensorDesc const* inputs) noexcept;
    cudaError_t launch(void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept;

private:
    int64_t mPlanes{0};
    int64_t mPositions{0};
};

} // namespace fluxshard
