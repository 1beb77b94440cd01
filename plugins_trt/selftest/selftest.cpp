// Self-test of plugins_trt, two modes:
//
//   selftest plugins LIBRARY.so   (no GPU needed) loads the plugin library the way TensorRT's
//       registry does (dlopen, getCreators) and checks what TensorRT asks a plugin at build time:
//       creators and their fields, attribute validation, output types, format combinations,
//       shape checks, workspace size, fields to serialize, clone.
//   selftest kernels GOLDEN_DIR   runs the CUDA kernels on golden cases written by
//       `python3 -m fluxshard.graph.golden DIR` (the torch executor's ops) and compares.
//       DIR/cases.txt lists case folders; each holds meta.txt ("key value" lines) and raw
//       little-endian tensors: float32 *.f32, int64 *.i64, bool *.u8.
//
// The checks of each plugin live in its folder (<name>Plugin/<name>Selftest.cpp) and register
// themselves; this file is the harness. Exit 0: every check passed; 1: a check failed; 2:
// kernels mode without a CUDA device.
#include "selftest.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <exception>

using namespace nvinfer1;

namespace selftest
{
namespace
{
int gChecks = 0, gFailures = 0;

std::vector<PluginChecks>& registered()
{
    static std::vector<PluginChecks> checks;
    return checks;
}

PluginChecks const* checksFor(std::string const& op)
{
    for (PluginChecks const& c : registered())
        if (op == c.op)
            return &c;
    return nullptr;
}

Meta meta(std::string const& dir)
{
    std::ifstream f(dir + "/meta.txt");
    Meta m;
    std::string key, value;
    while (f >> key >> value)
        m[key] = value;
    return m;
}

int pluginsMode(char const* library)
{
    void* handle = dlopen(library, RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr)
    {
        std::printf("FAILED: dlopen %s: %s\n", library, dlerror());
        return 1;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
    check(getCreators != nullptr && dlsym(handle, "setLoggerFinder") != nullptr, "library entry points");
    if (getCreators == nullptr)
        return 1;
    int32_t n = 0;
    IPluginCreatorInterface* const* creators = getCreators(n);
    std::vector<IPluginCreatorV3One*> ours(registered().size(), nullptr);
    bool allChecked = true;
    for (int32_t i = 0; i < n; ++i)
    {
        bool v3One = std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0;
        auto* creator = static_cast<IPluginCreatorV3One*>(creators[i]);
        PluginChecks const* c = v3One ? checksFor(creator->getPluginName()) : nullptr;
        allChecked = allChecked && c != nullptr;
        if (c != nullptr)
            ours[static_cast<size_t>(c - registered().data())] = creator;
    }
    check(allChecked, "every creator of the library is a V3One creator with checks here");
    for (size_t i = 0; i < ours.size(); ++i)
    {
        std::string what = std::string(registered()[i].op) + ": a V3One creator";
        check(ours[i] != nullptr, what.c_str());
        if (ours[i] != nullptr)
            registered()[i].plugin(ours[i]);
    }
    std::printf("%d passed, %d failed\n", gChecks - gFailures, gFailures);
    return gFailures == 0 ? 0 : 1;
}

int kernelsMode(char const* golden)
{
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0)
    {
        std::printf("no CUDA device: nothing checked\n");
        return 2;
    }
    std::string root = golden;
    std::ifstream list(root + "/cases.txt");
    std::string name;
    int failed = 0, cases = 0;
    try
    {
        while (list >> name)
        {
            std::string dir = root + "/" + name;
            Meta m = meta(dir);
            PluginChecks const* c = checksFor(m["op"]);
            if (c == nullptr)
                std::printf("%-40s no checks for op '%s'\n", dir.c_str(), m["op"].c_str());
            bool ok = c != nullptr && c->golden(dir, m);
            failed += !ok;
            ++cases;
        }
    }
    catch (std::exception const& e)
    {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    std::printf("%d passed, %d failed\n", cases - failed, failed);
    return failed == 0 && cases > 0 ? 0 : 1;
}
} // namespace

void check(bool ok, char const* what)
{
    ++gChecks;
    if (!ok)
    {
        ++gFailures;
        std::printf("FAILED: %s\n", what);
    }
}

Dims dims(std::vector<int64_t> const& v)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(v.size());
    for (size_t i = 0; i < v.size(); ++i)
        d.d[i] = v[i];
    return d;
}

PluginTensorDesc desc(std::vector<int64_t> const& shape, DataType type)
{
    PluginTensorDesc d{};
    d.dims = dims(shape);
    d.type = type;
    d.format = TensorFormat::kLINEAR;
    d.scale = -1.F;
    return d;
}

ChecksRegistration::ChecksRegistration(PluginChecks checks)
{
    registered().push_back(checks);
}

} // namespace selftest

int main(int argc, char** argv)
{
    if (argc == 3 && std::strcmp(argv[1], "plugins") == 0)
        return selftest::pluginsMode(argv[2]);
    if (argc == 3 && std::strcmp(argv[1], "kernels") == 0)
        return selftest::kernelsMode(argv[2]);
    std::fprintf(stderr, "usage: %s plugins LIBRARY.so | kernels GOLDEN_DIR\n", argv[0]);
    return 1;
}
