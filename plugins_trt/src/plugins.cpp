// The TensorRT IPluginV3 plugins MVGather and MaskedSparseConv (spec: fluxshard/sparse/spec.py),
// their creators, and the library entry points TensorRT's plugin registry looks up.
#include "fluxshard_kernels.h"
#include "plugin_common.h"

#include <cstdio>
#include <exception>
#include <memory>

using namespace nvinfer1;

namespace fluxshard
{
namespace
{
ILoggerFinder* gLoggerFinder = nullptr;

// ------------------------------------------------------------------------------------ MVGather
// inputs: cache float (N, C, H, W), field_index int64 (H*W), invalid bool (H, W); output gathered.
class MvGatherPlugin final : public PluginBase
{
public:
    IPluginV3* clone() noexcept override
    {
        return new (std::nothrow) MvGatherPlugin(*this);
    }

    char const* getPluginName() const noexcept override
    {
        return "MVGather";
    }

    int32_t getNbOutputs() const noexcept override
    {
        return 1;
    }

    int32_t getOutputDataTypes(DataType* out, int32_t nbOutputs, DataType const*, int32_t) const noexcept override
    {
        if (nbOutputs != 1)
            return -1;
        out[0] = DataType::kFLOAT;
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
        DimsExprs* outputs, int32_t nbOutputs, IExprBuilder&) noexcept override
    {
        if (nbInputs != 3 || nbOutputs != 1)
            return -1;
        outputs[0] = inputs[0];
        return 0;
    }

    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t, int32_t) noexcept override
    {
        static constexpr DataType kTypes[] = {DataType::kFLOAT, DataType::kINT64, DataType::kBOOL, DataType::kFLOAT};
        return pos >= 0 && pos < 4 && isLinear(io[pos].desc, kTypes[pos]);
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t nbInputs, DynamicPluginTensorDesc const*,
        int32_t nbOutputs) noexcept override
    {
        return nbInputs == 3 && nbOutputs == 1 ? 0 : -1;
    }

    int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*, int32_t) noexcept override
    {
        if (nbInputs != 3 || in[0].dims.nbDims != 4)
            return -1;
        mPlanes = int64_t{in[0].dims.d[0]} * in[0].dims.d[1];
        mPositions = int64_t{in[0].dims.d[2]} * in[0].dims.d[3];
        if (volume(in[1].dims) != mPositions || volume(in[2].dims) != mPositions)
        {
            logError("MVGather: field_index and invalid must cover the cache's H x W positions");
            return -1;
        }
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const*, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void*, cudaStream_t stream) noexcept override
    {
        cudaError_t e = launchMvGather(static_cast<float const*>(inputs[0]), static_cast<int64_t const*>(inputs[1]),
            static_cast<bool const*>(inputs[2]), static_cast<float*>(outputs[0]), mPlanes, mPositions, stream);
        return e == cudaSuccess ? 0 : -1;
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        return &mNoFields;
    }

private:
    int64_t mPlanes{0};
    int64_t mPositions{0};
    PluginFieldCollection mNoFields{0, nullptr};
};

// ---------------------------------------------------------------------------- MaskedSparseConv
// inputs: x (1, Cin, Hi, Wi), recompute bool (Ho, Wo), gathered (1, Cout, Ho, Wo), invalid bool
// (Ho, Wo), W (Cout, Cin/group, k, k), b (Cout); outputs: y (1, Cout, Ho, Wo), changed bool (Ho, Wo).
struct ConvAttributes
{
    std::vector<int32_t> kernelShape, strides, pads;
    int32_t group{1};
    std::string activation{"silu"};
    float threshold{0.F};
    int32_t tile{0};

    static ConvAttributes parse(PluginFieldCollection const* fc)
    {
        FieldReader r(fc);
        ConvAttributes a;
        a.kernelShape = r.ints("kernel_shape", 2);
        a.strides = r.ints("strides", 2, {1, 1});
        a.pads = r.ints("pads", 4, {0, 0, 0, 0});
        a.group = r.integer("group", 1);
        a.activation = r.text("activation", "silu");
        a.threshold = r.real("threshold", 0.F);
        a.tile = r.integer("tile", 0);
        if (a.kernelShape[0] != a.kernelShape[1] || a.kernelShape[0] < 1)
            throw std::invalid_argument("kernel_shape must be square and positive");
        if (a.strides[0] != a.strides[1] || a.strides[0] < 1)
            throw std::invalid_argument("strides must be equal and positive");
        if (a.pads[0] != a.pads[2] || a.pads[1] != a.pads[3] || a.pads[0] < 0 || a.pads[1] < 0)
            throw std::invalid_argument("pads must be symmetric and >= 0");
        if (a.group < 1 || a.tile < 0 || !(a.threshold >= 0.F))
            throw std::invalid_argument("group >= 1, tile >= 0 and threshold >= 0 are required");
        if (a.activation != "silu" && a.activation != "none")
            throw std::invalid_argument("activation must be silu or none, got " + a.activation);
        return a;
    }
};

class MaskedSparseConvPlugin final : public PluginBase
{
public:
    explicit MaskedSparseConvPlugin(ConvAttributes attributes)
        : mA(std::move(attributes))
    {
        buildFields();
    }

    MaskedSparseConvPlugin(MaskedSparseConvPlugin const& other)
        : PluginBase(other)
        , mA(other.mA)
        , mGeometry(other.mGeometry)
    {
        buildFields();
    }

    IPluginV3* clone() noexcept override
    {
        return new (std::nothrow) MaskedSparseConvPlugin(*this);
    }

    char const* getPluginName() const noexcept override
    {
        return "MaskedSparseConv";
    }

    int32_t getNbOutputs() const noexcept override
    {
        return 2;
    }

    int32_t getOutputDataTypes(DataType* out, int32_t nbOutputs, DataType const*, int32_t) const noexcept override
    {
        if (nbOutputs != 2)
            return -1;
        out[0] = DataType::kFLOAT;
        out[1] = DataType::kBOOL;
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
        DimsExprs* outputs, int32_t nbOutputs, IExprBuilder&) noexcept override
    {
        if (nbInputs != 6 || nbOutputs != 2)
            return -1;
        outputs[0] = inputs[2]; // y: shaped like the gathered cache
        outputs[1] = inputs[1]; // changed: shaped like recompute
        return 0;
    }

    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t, int32_t) noexcept override
    {
        static constexpr DataType kTypes[] = {DataType::kFLOAT, DataType::kBOOL, DataType::kFLOAT, DataType::kBOOL,
            DataType::kFLOAT, DataType::kFLOAT, DataType::kFLOAT, DataType::kBOOL};
        return pos >= 0 && pos < 8 && isLinear(io[pos].desc, kTypes[pos]);
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t nbInputs, DynamicPluginTensorDesc const*,
        int32_t nbOutputs) noexcept override
    {
        return nbInputs == 6 && nbOutputs == 2 ? 0 : -1;
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
        int32_t) const noexcept override
    {
        ConvGeometry g{};
        if (nbInputs != 6 || !geometry(in[0].max, in[2].max, g))
            return 0;
        return maskedSparseConvWorkspace(g);
    }

    int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*, int32_t) noexcept override
    {
        if (nbInputs != 6 || !geometry(in[0].dims, in[2].dims, mGeometry))
            return -1;
        Dims const& w = in[4].dims;
        bool ok = w.nbDims == 4 && w.d[0] == mGeometry.cout && w.d[1] * mA.group == mGeometry.cin
            && w.d[2] == mA.kernelShape[0] && w.d[3] == mA.kernelShape[1] && volume(in[5].dims) == mGeometry.cout
            && volume(in[1].dims) == int64_t{mGeometry.hout} * mGeometry.wout
            && volume(in[3].dims) == int64_t{mGeometry.hout} * mGeometry.wout
            && mGeometry.cout % mA.group == 0 && mGeometry.cin % mA.group == 0;
        if (!ok)
            logError("MaskedSparseConv: input shapes do not match the conv's attributes");
        return ok ? 0 : -1;
    }

    int32_t enqueue(PluginTensorDesc const*, PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        cudaError_t e = launchMaskedSparseConv(mGeometry, static_cast<float const*>(inputs[0]),
            static_cast<bool const*>(inputs[1]), static_cast<float const*>(inputs[2]),
            static_cast<bool const*>(inputs[3]), static_cast<float const*>(inputs[4]),
            static_cast<float const*>(inputs[5]), static_cast<float*>(outputs[0]), static_cast<bool*>(outputs[1]),
            workspace, stream);
        return e == cudaSuccess ? 0 : -1;
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        return &mCollection;
    }

private:
    // x (1, Cin, Hi, Wi) and gathered (1, Cout, Ho, Wo), checked against the conv arithmetic.
    bool geometry(Dims const& x, Dims const& gathered, ConvGeometry& g) const noexcept
    {
        if (x.nbDims != 4 || gathered.nbDims != 4 || x.d[0] != 1 || gathered.d[0] != 1)
            return false;
        g.cin = static_cast<int32_t>(x.d[1]);
        g.hin = static_cast<int32_t>(x.d[2]);
        g.win = static_cast<int32_t>(x.d[3]);
        g.cout = static_cast<int32_t>(gathered.d[1]);
        g.hout = static_cast<int32_t>(gathered.d[2]);
        g.wout = static_cast<int32_t>(gathered.d[3]);
        g.kernel = mA.kernelShape[0];
        g.stride = mA.strides[0];
        g.padTop = mA.pads[0];
        g.padLeft = mA.pads[1];
        g.group = mA.group;
        g.silu = mA.activation == "silu" ? 1 : 0;
        g.threshold = mA.threshold;
        g.tile = mA.tile;
        return g.hout == (g.hin + 2 * g.padTop - g.kernel) / g.stride + 1
            && g.wout == (g.win + 2 * g.padLeft - g.kernel) / g.stride + 1;
    }

    void buildFields()
    {
        mFields = {PluginField("kernel_shape", mA.kernelShape.data(), PluginFieldType::kINT32, 2),
            PluginField("strides", mA.strides.data(), PluginFieldType::kINT32, 2),
            PluginField("pads", mA.pads.data(), PluginFieldType::kINT32, 4),
            PluginField("group", &mA.group, PluginFieldType::kINT32, 1),
            PluginField("activation", mA.activation.c_str(), PluginFieldType::kCHAR,
                static_cast<int32_t>(mA.activation.size() + 1)),
            PluginField("threshold", &mA.threshold, PluginFieldType::kFLOAT32, 1),
            PluginField("tile", &mA.tile, PluginFieldType::kINT32, 1)};
        mCollection = {static_cast<int32_t>(mFields.size()), mFields.data()};
    }

    ConvAttributes mA;
    ConvGeometry mGeometry{};
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

// ------------------------------------------------------------------------------------ creators
class CreatorBase : public IPluginCreatorV3One
{
public:
    char const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }

    char const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }

    PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mCollection;
    }

protected:
    void declare(std::vector<PluginField> fields)
    {
        mFields = std::move(fields);
        mCollection = {static_cast<int32_t>(mFields.size()), mFields.data()};
    }

private:
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

class MvGatherCreator final : public CreatorBase
{
public:
    MvGatherCreator()
    {
        declare({});
    }

    char const* getPluginName() const noexcept override
    {
        return "MVGather";
    }

    IPluginV3* createPlugin(char const*, PluginFieldCollection const*, TensorRTPhase) noexcept override
    {
        return new (std::nothrow) MvGatherPlugin();
    }
};

class MaskedSparseConvCreator final : public CreatorBase
{
public:
    MaskedSparseConvCreator()
    {
        declare({PluginField("kernel_shape", nullptr, PluginFieldType::kINT32, 2),
            PluginField("strides", nullptr, PluginFieldType::kINT32, 2),
            PluginField("pads", nullptr, PluginFieldType::kINT32, 4),
            PluginField("group", nullptr, PluginFieldType::kINT32, 1),
            PluginField("activation", nullptr, PluginFieldType::kCHAR, 0),
            PluginField("threshold", nullptr, PluginFieldType::kFLOAT32, 1),
            PluginField("tile", nullptr, PluginFieldType::kINT32, 1)});
    }

    char const* getPluginName() const noexcept override
    {
        return "MaskedSparseConv";
    }

    IPluginV3* createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase) noexcept override
    {
        try
        {
            return new MaskedSparseConvPlugin(ConvAttributes::parse(fc));
        }
        catch (std::exception const& e)
        {
            logError(std::string("MaskedSparseConv ") + (name ? name : "") + ": " + e.what());
            return nullptr;
        }
    }
};

} // namespace

void logError(std::string const& message) noexcept
{
    ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
    if (logger != nullptr)
        logger->log(ILogger::Severity::kERROR, message.c_str());
    else
        std::fprintf(stderr, "fluxshard plugins: %s\n", message.c_str());
}

} // namespace fluxshard

// Entry points the TensorRT plugin registry looks up in a plugin library (loadLibrary).
extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    fluxshard::gLoggerFinder = finder;
}

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
    int32_t& nbCreators)
{
    static fluxshard::MvGatherCreator gather;
    static fluxshard::MaskedSparseConvCreator conv;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&gather, &conv};
    nbCreators = 2;
    return creators;
}
