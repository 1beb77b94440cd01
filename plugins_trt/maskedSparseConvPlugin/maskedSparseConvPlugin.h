// MaskedSparseConv as a TensorRT IPluginV3 (spec: fluxshard/sparse/spec.py; README.md here).
// inputs: x (1, Cin, Hi, Wi), recompute bool (Ho, Wo), gathered (1, Cout, Ho, Wo), invalid bool
// (Ho, Wo), W (Cout, Cin/group, k, k), b (Cout); outputs: y (1, Cout, Ho, Wo), changed bool (Ho, Wo).
#pragma once

#include "maskedSparseConvKernel.h"
#include "pluginBase.h"

#include <string>
#include <vector>

namespace fluxshard
{

// The attributes of the spec; what it does not define is refused by parse.
struct ConvAttributes
{
    std::vector<int32_t> kernelShape, strides, pads;
    int32_t group{1};
    std::string activation{"silu"};
    float threshold{0.F};
    int32_t tile{0};

    static ConvAttributes parse(nvinfer1::PluginFieldCollection const* fc);
    std::vector<nvinfer1::PluginField> fields() const;
};

class MaskedSparseConvPlugin final : public PluginV3Base<MaskedSparseConvPlugin, ConvAttributes>
{
public:
    static constexpr char const* kName = "MaskedSparseConv";
    static constexpr char const* kVersion = "1";
    static constexpr nvinfer1::DataType kInputTypes[] = {nvinfer1::DataType::kFLOAT, nvinfer1::DataType::kBOOL,
        nvinfer1::DataType::kFLOAT, nvinfer1::DataType::kBOOL, nvinfer1::DataType::kFLOAT, nvinfer1::DataType::kFLOAT};
    static constexpr nvinfer1::DataType kOutputTypes[] = {nvinfer1::DataType::kFLOAT, nvinfer1::DataType::kBOOL};

    using PluginV3Base::PluginV3Base;

    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    void outputShapes(nvinfer1::DimsExprs const* inputs, nvinfer1::DimsExprs* outputs) const noexcept;
    bool acceptShapes(nvinfer1::PluginTensorDesc const* inputs) noexcept;
    cudaError_t launch(void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept;

private:
    bool geometry(nvinfer1::Dims const& x, nvinfer1::Dims const& gathered, ConvGeometry& g) const noexcept;

    ConvGeometry mGeometry{};
};

} // namespace fluxshard
