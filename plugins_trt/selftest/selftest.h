// What the per-plugin self-test checks (<name>Plugin/<name>Selftest.cpp) share: counting checks,
// tensor descriptions, golden-case files, and the registration of each plugin's checks.
#pragma once

#include <NvInferRuntime.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace selftest
{

// Counts a check; prints what failed.
void check(bool ok, char const* what);

nvinfer1::Dims dims(std::vector<int64_t> const& v);
nvinfer1::PluginTensorDesc desc(std::vector<int64_t> const& shape, nvinfer1::DataType type);

template <typename Capability>
Capability* capability(nvinfer1::IPluginV3* plugin, nvinfer1::PluginCapabilityType type)
{
    return static_cast<Capability*>(plugin->getCapabilityInterface(type));
}

// A golden case's meta.txt ("key value" lines).
using Meta = std::map<std::string, std::string>;

// Raw little-endian tensors of a golden case.
template <typename T>
std::vector<T> load(std::string const& path)
{
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    if (!f)
        throw std::runtime_error("cannot read " + path);
    std::streamsize bytes = f.tellg();
    f.seekg(0);
    std::vector<T> v(static_cast<size_t>(bytes) / sizeof(T));
    f.read(reinterpret_cast<char*>(v.data()), bytes);
    return v;
}

template <typename T>
T* device(std::vector<T> const& host)
{
    T* d = nullptr;
    cudaMalloc(&d, host.size() * sizeof(T) + 1);
    cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
    return d;
}

template <typename T>
std::vector<T> fetch(T const* d, size_t n)
{
    std::vector<T> h(n);
    cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
    return h;
}

// One plugin's checks: `plugin` asks its creator (found in the loaded library by `op`) what
// TensorRT asks at build time; `golden` runs its kernel on one golden case (meta "op" == `op`).
struct PluginChecks
{
    char const* op;
    void (*plugin)(nvinfer1::IPluginCreatorV3One* creator);
    bool (*golden)(std::string const& dir, Meta& meta);
};

// A static object of this type adds a plugin's checks to the self-test.
struct ChecksRegistration
{
    explicit ChecksRegistration(PluginChecks checks);
};

} // namespace selftest
