// What both FluxShard plugins share: attribute parsing, logging through TensorRT's logger, and the
// capability plumbing of IPluginV3.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace fluxshard
{

constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "";

// TensorRT's logger, once the library loader has handed us its finder (setLoggerFinder).
void logError(std::string const& message) noexcept;

// Reads named attributes from a PluginFieldCollection (the ONNX parser passes ints as kINT32,
// floats as kFLOAT32, strings as kCHAR). Throws std::invalid_argument with the attribute's name.
class FieldReader
{
public:
    explicit FieldReader(nvinfer1::PluginFieldCollection const* fields)
        : mFields(fields)
    {
    }

    std::vector<int32_t> ints(char const* name, int32_t count, std::vector<int32_t> fallback = {}) const
    {
        nvinfer1::PluginField const* f = find(name);
        if (f == nullptr)
        {
            if (fallback.empty())
                throw std::invalid_argument(std::string("missing attribute ") + name);
            return fallback;
        }
        if (f->type != nvinfer1::PluginFieldType::kINT32 || f->length != count)
            throw std::invalid_argument(std::string("attribute ") + name + " must be " + std::to_string(count) + " int32");
        auto const* v = static_cast<int32_t const*>(f->data);
        return {v, v + count};
    }

    int32_t integer(char const* name, int32_t fallback) const
    {
        return ints(name, 1, {fallback})[0];
    }

    float real(char const* name, float fallback) const
    {
        nvinfer1::PluginField const* f = find(name);
        if (f == nullptr)
            return fallback;
        if (f->type == nvinfer1::PluginFieldType::kFLOAT32 && f->length == 1)
            return *static_cast<float const*>(f->data);
        if (f->type == nvinfer1::PluginFieldType::kFLOAT64 && f->length == 1)
            return static_cast<float>(*static_cast<double const*>(f->data));
        throw std::invalid_argument(std::string("attribute ") + name + " must be one float");
    }

    std::string text(char const* name, char const* fallback) const
    {
        nvinfer1::PluginField const* f = find(name);
        if (f == nullptr)
            return fallback;
        if (f->type != nvinfer1::PluginFieldType::kCHAR)
            throw std::invalid_argument(std::string("attribute ") + name + " must be a string");
        std::string s(static_cast<char const*>(f->data), static_cast<size_t>(f->length));
        return s.substr(0, s.find('\0'));
    }

private:
    nvinfer1::PluginField const* find(char const* name) const
    {
        if (mFields == nullptr)
            return nullptr;
        for (int32_t i = 0; i < mFields->nbFields; ++i)
            if (mFields->fields[i].name != nullptr && std::strcmp(mFields->fields[i].name, name) == 0)
                return &mFields->fields[i];
        return nullptr;
    }

    nvinfer1::PluginFieldCollection const* mFields;
};

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

// IPluginV3 with the three V3One capabilities implemented by one object.
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime
{
public:
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

    char const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }

    char const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }

    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override
    {
        return clone();
    }
};

} // namespace fluxshard
