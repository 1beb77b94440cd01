// The IPluginV3 plumbing every FluxShard plugin shares, so that a plugin's own files hold only
// what is its own: name and version, input and output types, attributes, shape rules, launch.
//
// A plugin is `class XPlugin final : public PluginV3Base<XPlugin, XAttributes>` providing
//   static constexpr char const* kName, kVersion;
//   static constexpr nvinfer1::DataType kInputTypes[], kOutputTypes[];   (linear format each)
//   void outputShapes(DimsExprs const* inputs, DimsExprs* outputs) const noexcept;
//   bool acceptShapes(PluginTensorDesc const* inputs) noexcept;   (onShapeChange; logs why not)
//   cudaError_t launch(void const* const* inputs, void* const* outputs, void* workspace,
//                      cudaStream_t stream) noexcept;
// and, where it needs scratch, getWorkspaceSize. XAttributes (NoAttributes for none) provides
//   static XAttributes parse(PluginFieldCollection const*);   (throws std::invalid_argument)
//   std::vector<PluginField> fields() const;   (what is serialized, pointing into itself)
// Its source then says REGISTER_FLUXSHARD_PLUGIN(XPlugin); and the library lists its creator.
#pragma once

#include "pluginFields.h"
#include "pluginRegistry.h"

#include <NvInferRuntime.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <iterator>
#include <new>
#include <string>
#include <utility>
#include <vector>

namespace fluxshard
{

// Every plugin of this library lives in the default namespace.
constexpr char const* kPluginNamespace = "";

inline bool isLinear(nvinfer1::PluginTensorDesc const& d, nvinfer1::DataType type)
{
    return d.format == nvinfer1::TensorFormat::kLINEAR && d.type == type;
}

inline int64_t volume(nvinfer1::Dims const& d)
{
    int64_t v = 1;
    for (int32_t i = 0; i < d.nbDims; ++i)
        v *= d.d[i];
    return v;
}

// The attributes of a plugin that has none: whatever fields come are ignored.
struct NoAttributes
{
    static NoAttributes parse(nvinfer1::PluginFieldCollection const*)
    {
        return {};
    }

    std::vector<nvinfer1::PluginField> fields() const
    {
        return {};
    }
};

// Name, version and namespace of Plugin, for its IPluginV3OneCore and its creator alike.
template <typename Plugin, typename Interface>
class PluginIdentity : public Interface
{
public:
    char const* getPluginName() const noexcept override
    {
        return Plugin::kName;
    }

    char const* getPluginVersion() const noexcept override
    {
        return Plugin::kVersion;
    }

    char const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }
};

// IPluginV3 with the three V3One capabilities implemented by one object.
template <typename Derived, typename Attributes = NoAttributes>
class PluginV3Base : public nvinfer1::IPluginV3,
                     public PluginIdentity<Derived, nvinfer1::IPluginV3OneCore>,
                     public nvinfer1::IPluginV3OneBuild,
                     public nvinfer1::IPluginV3OneRuntime
{
public:
    using AttributesType = Attributes;

    explicit PluginV3Base(Attributes attributes)
        : mAttributes(std::move(attributes))
    {
        collectFields();
    }

    // The serialized fields point into the attributes: a copy points into its own.
    PluginV3Base(PluginV3Base const& other)
        : mAttributes(other.mAttributes)
    {
        collectFields();
    }

    PluginV3Base& operator=(PluginV3Base const&) = delete;

    // ------------------------------------------------------------------------------ IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        }
        return nullptr;
    }

    nvinfer1::IPluginV3* clone() noexcept override
    {
        return new (std::nothrow) Derived(static_cast<Derived const&>(*this));
    }

    // ----------------------------------------------------------------------- IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override
    {
        return nbOutputs();
    }

    int32_t getOutputDataTypes(nvinfer1::DataType* out, int32_t nbOutputs_, nvinfer1::DataType const*,
        int32_t) const noexcept override
    {
        if (nbOutputs_ != nbOutputs())
            return -1;
        std::copy(std::begin(Derived::kOutputTypes), std::end(Derived::kOutputTypes), out);
        return 0;
    }

    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs_, nvinfer1::DimsExprs const*,
        int32_t, nvinfer1::DimsExprs* outputs, int32_t nbOutputs_, nvinfer1::IExprBuilder&) noexcept override
    {
        if (nbInputs_ != nbInputs() || nbOutputs_ != nbOutputs())
            return -1;
        derived().outputShapes(inputs, outputs);
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, nvinfer1::DynamicPluginTensorDesc const* io, int32_t, int32_t) noexcept override
    {
        if (pos < 0 || pos >= nbInputs() + nbOutputs())
            return false;
        return isLinear(io[pos].desc,
            pos < nbInputs() ? Derived::kInputTypes[pos] : Derived::kOutputTypes[pos - nbInputs()]);
    }

    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const*, int32_t nbInputs_,
        nvinfer1::DynamicPluginTensorDesc const*, int32_t nbOutputs_) noexcept override
    {
        return nbInputs_ == nbInputs() && nbOutputs_ == nbOutputs() ? 0 : -1;
    }

    // --------------------------------------------------------------------- IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs_, nvinfer1::PluginTensorDesc const*,
        int32_t) noexcept override
    {
        return nbInputs_ == nbInputs() && derived().acceptShapes(in) ? 0 : -1;
    }

    int32_t enqueue(nvinfer1::PluginTensorDesc const*, nvinfer1::PluginTensorDesc const*, void const* const* inputs,
        void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        return derived().launch(inputs, outputs, workspace, stream) == cudaSuccess ? 0 : -1;
    }

    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override
    {
        return clone();
    }

    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        return &mCollection;
    }

protected:
    static constexpr int32_t nbInputs()
    {
        return static_cast<int32_t>(std::size(Derived::kInputTypes));
    }

    static constexpr int32_t nbOutputs()
    {
        return static_cast<int32_t>(std::size(Derived::kOutputTypes));
    }

    Attributes const& attributes() const noexcept
    {
        return mAttributes;
    }

private:
    Derived& derived() noexcept
    {
        return static_cast<Derived&>(*this);
    }

    void collectFields()
    {
        mFields = mAttributes.fields();
        mCollection = collectionOf(mFields);
    }

    Attributes mAttributes;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

// The creator of Plugin: its name, version and declared fields come from the plugin; createPlugin
// parses the attributes and logs (and returns null for) what they refuse.
template <typename Plugin>
class PluginCreatorV3 final : public PluginIdentity<Plugin, nvinfer1::IPluginCreatorV3One>
{
public:
    PluginCreatorV3()
        : mFields(declaredFields(typename Plugin::AttributesType{}.fields()))
        , mCollection(collectionOf(mFields))
    {
    }

    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mCollection;
    }

    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase) noexcept override
    {
        try
        {
            return new Plugin(Plugin::AttributesType::parse(fc));
        }
        catch (std::exception const& e)
        {
            logError(std::string(Plugin::kName) + " " + (name ? name : "") + ": " + e.what());
            return nullptr;
        }
    }

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mCollection{};
};

} // namespace fluxshard

// In a plugin's source: lists its creator in the library (getCreators).
#define REGISTER_FLUXSHARD_PLUGIN(PluginClass)                                                                        \
    static ::fluxshard::CreatorRegistration<::fluxshard::PluginCreatorV3<PluginClass>> const gRegister##PluginClass {}
