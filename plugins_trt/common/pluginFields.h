// Plugin attributes as TensorRT passes them (PluginFieldCollection): reading them by name when a
// creator makes a plugin, and the collections a plugin serializes and a creator declares.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace fluxshard
{

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

// A string field pointing at `text` (with its terminating NUL, as the engine stores it).
inline nvinfer1::PluginField stringField(char const* name, std::string const& text)
{
    return {name, text.c_str(), nvinfer1::PluginFieldType::kCHAR, static_cast<int32_t>(text.size() + 1)};
}

// What a creator declares (getFieldNames) for the fields a plugin serializes: names, types and
// lengths without data; a string's length is 0 (any length).
inline std::vector<nvinfer1::PluginField> declaredFields(std::vector<nvinfer1::PluginField> fields)
{
    for (nvinfer1::PluginField& f : fields)
    {
        f.data = nullptr;
        if (f.type == nvinfer1::PluginFieldType::kCHAR)
            f.length = 0;
    }
    return fields;
}

// A collection over `fields`, which must outlive it (both live in the plugin or creator).
inline nvinfer1::PluginFieldCollection collectionOf(std::vector<nvinfer1::PluginField>& fields)
{
    return {static_cast<int32_t>(fields.size()), fields.data()};
}

} // namespace fluxshard
