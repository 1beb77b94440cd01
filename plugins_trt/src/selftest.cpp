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
// Exit 0: every check passed; 1: a check failed; 2: kernels mode without a CUDA device.
#include "fluxshard_kernels.h"

#include <NvInferRuntime.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cstring>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace
{
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

std::map<std::string, std::string> meta(std::string const& dir)
{
    std::ifstream f(dir + "/meta.txt");
    std::map<std::string, std::string> m;
    std::string key, value;
    while (f >> key >> value)
        m[key] = value;
    return m;
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

std::vector<bool> asBool(std::vector<uint8_t> const& v)
{
    return {v.begin(), v.end()};
}

bool gatherCase(std::string const& dir, std::map<std::string, std::string>& m)
{
    auto cache = load<float>(dir + "/cache.f32");
    auto index = load<int64_t>(dir + "/index.i64");
    auto invalid = load<uint8_t>(dir + "/invalid.u8");
    auto expected = load<float>(dir + "/gathered.f32");
    int64_t planes = std::stoll(m["planes"]), positions = std::stoll(m["positions"]);
    float* dCache = device(cache);
    int64_t* dIndex = device(index);
    auto* dInvalid = reinterpret_cast<bool*>(device(invalid));
    float* dOut = nullptr;
    cudaMalloc(&dOut, expected.size() * sizeof(float));
    fluxshard::launchMvGather(dCache, dIndex, dInvalid, dOut, planes, positions, nullptr);
    auto got = fetch(dOut, expected.size());
    size_t wrong = 0;
    for (size_t i = 0; i < got.size(); ++i)
        wrong += got[i] != expected[i];
    std::printf("%-40s MVGather: %zu of %zu values differ\n", dir.c_str(), wrong, got.size());
    cudaFree(dCache), cudaFree(dIndex), cudaFree(dInvalid), cudaFree(dOut);
    return wrong == 0;
}

bool convCase(std::string const& dir, std::map<std::string, std::string>& m)
{
    fluxshard::ConvGeometry g{};
    g.cin = std::stoi(m["cin"]), g.hin = std::stoi(m["hin"]), g.win = std::stoi(m["win"]);
    g.cout = std::stoi(m["cout"]), g.hout = std::stoi(m["hout"]), g.wout = std::stoi(m["wout"]);
    g.kernel = std::stoi(m["kernel"]), g.stride = std::stoi(m["stride"]);
    g.padTop = g.padLeft = std::stoi(m["pad"]);
    g.group = std::stoi(m["group"]), g.silu = std::stoi(m["silu"]);
    g.threshold = std::stof(m["threshold"]), g.tile = std::stoi(m["tile"]);
    float atol = std::stof(m["atol"]), rtol = std::stof(m["rtol"]);
    auto x = load<float>(dir + "/x.f32");
    auto recompute = load<uint8_t>(dir + "/recompute.u8");
    auto gathered = load<float>(dir + "/gathered.f32");
    auto invalid = load<uint8_t>(dir + "/invalid.u8");
    auto w = load<float>(dir + "/W.f32");
    auto b = load<float>(dir + "/b.f32");
    auto yExpected = load<float>(dir + "/y.f32");
    auto changedExpected = load<uint8_t>(dir + "/changed.u8");
    float *dX = device(x), *dG = device(gathered), *dW = device(w), *dB = device(b), *dY = nullptr;
    auto* dR = reinterpret_cast<bool*>(device(recompute));
    auto* dI = reinterpret_cast<bool*>(device(invalid));
    bool* dC = nullptr;
    void* workspace = nullptr;
    cudaMalloc(&dY, yExpected.size() * sizeof(float));
    cudaMalloc(&dC, changedExpected.size());
    cudaMalloc(&workspace, fluxshard::maskedSparseConvWorkspace(g));
    cudaError_t e = fluxshard::launchMaskedSparseConv(g, dX, dR, dG, dI, dW, dB, dY, dC, workspace, nullptr);
    auto y = fetch(dY, yExpected.size());
    auto changed = fetch(reinterpret_cast<uint8_t*>(dC), changedExpected.size());
    size_t wrongMask = 0, wrongValues = 0;
    float worst = 0.F;
    for (size_t i = 0; i < changed.size(); ++i)
        wrongMask += (changed[i] != 0) != (changedExpected[i] != 0);
    for (size_t i = 0; i < y.size(); ++i)
    {
        float d = std::fabs(y[i] - yExpected[i]);
        worst = std::fmax(worst, d);
        wrongValues += d > atol + rtol * std::fabs(yExpected[i]);
    }
    std::printf("%-40s MaskedSparseConv: %s, changed mask %zu differ, values %zu beyond tolerance (max |d| %.2e)\n",
        dir.c_str(), cudaGetErrorString(e), wrongMask, wrongValues, worst);
    cudaFree(dX), cudaFree(dG), cudaFree(dW), cudaFree(dB), cudaFree(dY), cudaFree(dR), cudaFree(dI), cudaFree(dC);
    cudaFree(workspace);
    return e == cudaSuccess && wrongMask == 0 && wrongValues == 0;
}

// ------------------------------------------------------------------------------- plugins mode
using namespace nvinfer1;

int gChecks = 0, gFailures = 0;

void check(bool ok, char const* what)
{
    ++gChecks;
    if (!ok)
    {
        ++gFailures;
        std::printf("FAILED: %s\n", what);
    }
}

IPluginCreatorV3One* findCreator(IPluginCreatorInterface* const* creators, int32_t n, char const* name)
{
    for (int32_t i = 0; i < n; ++i)
    {
        if (std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0)
            continue;
        auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
        if (std::strcmp(c->getPluginName(), name) == 0)
            return c;
    }
    return nullptr;
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

struct ConvFields
{
    int32_t kernel[2]{3, 3}, strides[2]{2, 2}, pads[4]{1, 1, 1, 1}, group{1}, tile{4};
    float threshold{0.05F};
    char activation[8]{"silu"};
    std::vector<PluginField> fields()
    {
        return {PluginField("kernel_shape", kernel, PluginFieldType::kINT32, 2),
            PluginField("strides", strides, PluginFieldType::kINT32, 2),
            PluginField("pads", pads, PluginFieldType::kINT32, 4), PluginField("group", &group, PluginFieldType::kINT32, 1),
            PluginField("activation", activation, PluginFieldType::kCHAR, static_cast<int32_t>(std::strlen(activation))),
            PluginField("threshold", &threshold, PluginFieldType::kFLOAT32, 1),
            PluginField("tile", &tile, PluginFieldType::kINT32, 1)};
    }
};

IPluginV3* create(IPluginCreatorV3One* creator, ConvFields f)
{
    auto fields = f.fields();
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    return creator->createPlugin("selftest", &fc, TensorRTPhase::kBUILD);
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
    IPluginCreatorV3One* convCreator = findCreator(creators, n, "MaskedSparseConv");
    IPluginCreatorV3One* gatherCreator = findCreator(creators, n, "MVGather");
    check(n == 2 && convCreator != nullptr && gatherCreator != nullptr, "two V3One creators");
    if (convCreator == nullptr || gatherCreator == nullptr)
        return 1;
    check(std::strcmp(convCreator->getPluginVersion(), "1") == 0, "plugin version 1");
    check(convCreator->getFieldNames()->nbFields == 7, "MaskedSparseConv declares 7 fields");

    // attribute validation: what the spec does not define is refused
    ConvFields bad;
    std::strcpy(bad.activation, "relu");
    check(create(convCreator, bad) == nullptr, "activation relu refused");
    bad = ConvFields{};
    bad.strides[0] = 0, bad.strides[1] = 0;
    check(create(convCreator, bad) == nullptr, "stride 0 refused");
    bad = ConvFields{};
    bad.kernel[1] = 1;
    check(create(convCreator, bad) == nullptr, "non-square kernel refused");

    IPluginV3* plugin = create(convCreator, ConvFields{});
    check(plugin != nullptr, "MaskedSparseConv created");
    if (plugin == nullptr)
        return 1;
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(std::strcmp(core->getPluginName(), "MaskedSparseConv") == 0, "plugin name");
    check(build->getNbOutputs() == 2, "two outputs");
    DataType in[6]{}, out[2]{};
    check(build->getOutputDataTypes(out, 2, in, 6) == 0 && out[0] == DataType::kFLOAT && out[1] == DataType::kBOOL,
        "output types float, bool");

    // x (1, 8, 20, 28) -> conv k3 s2 p1 -> (1, 16, 10, 14)
    std::vector<PluginTensorDesc> io{desc({1, 8, 20, 28}, DataType::kFLOAT), desc({10, 14}, DataType::kBOOL),
        desc({1, 16, 10, 14}, DataType::kFLOAT), desc({10, 14}, DataType::kBOOL), desc({16, 8, 3, 3}, DataType::kFLOAT),
        desc({16}, DataType::kFLOAT), desc({1, 16, 10, 14}, DataType::kFLOAT), desc({10, 14}, DataType::kBOOL)};
    std::vector<DynamicPluginTensorDesc> dyn(io.size());
    for (size_t i = 0; i < io.size(); ++i)
        dyn[i] = DynamicPluginTensorDesc{io[i], io[i].dims, io[i].dims, io[i].dims};
    bool formats = true;
    for (int32_t pos = 0; pos < 8; ++pos)
        formats = formats && build->supportsFormatCombination(pos, dyn.data(), 6, 2);
    check(formats, "float/bool linear formats accepted");
    dyn[1].desc.type = DataType::kFLOAT;
    check(!build->supportsFormatCombination(1, dyn.data(), 6, 2), "a float recompute mask refused");
    dyn[1].desc.type = DataType::kBOOL;
    check(build->configurePlugin(dyn.data(), 6, dyn.data() + 6, 2) == 0, "configurePlugin");
    fluxshard::ConvGeometry g{8, 20, 28, 16, 10, 14, 3, 2, 1, 1, 1, 1, 0.05F, 4};
    check(build->getWorkspaceSize(dyn.data(), 6, dyn.data() + 6, 2) == fluxshard::maskedSparseConvWorkspace(g),
        "workspace size");
    check(runtime->onShapeChange(io.data(), 6, io.data() + 6, 2) == 0, "consistent shapes accepted");
    std::vector<PluginTensorDesc> wrong = io;
    wrong[2].dims = dims({1, 16, 20, 28}); // gathered not at the conv's output size
    check(runtime->onShapeChange(wrong.data(), 6, wrong.data() + 6, 2) != 0, "output size mismatch refused");
    wrong = io;
    wrong[4].dims = dims({16, 4, 3, 3}); // weights of another group count
    check(runtime->onShapeChange(wrong.data(), 6, wrong.data() + 6, 2) != 0, "weight shape mismatch refused");

    // fields to serialize: what the engine stores and hands back to createPlugin at runtime
    PluginFieldCollection const* saved = runtime->getFieldsToSerialize();
    IPluginV3* restored = convCreator->createPlugin("restored", saved, TensorRTPhase::kRUNTIME);
    check(saved != nullptr && saved->nbFields == 7 && restored != nullptr, "serialized fields recreate the plugin");
    if (restored != nullptr)
    {
        auto* r = static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        PluginFieldCollection const* again = r->getFieldsToSerialize();
        bool same = again->nbFields == saved->nbFields;
        for (int32_t i = 0; same && i < again->nbFields; ++i)
        {
            PluginField const &a = saved->fields[i], &b = again->fields[i];
            size_t bytes = a.type == PluginFieldType::kCHAR ? 1 : 4;
            same = std::strcmp(a.name, b.name) == 0 && a.type == b.type && a.length == b.length
                && std::memcmp(a.data, b.data, bytes * static_cast<size_t>(a.length)) == 0;
        }
        check(same, "fields round-trip unchanged");
        delete restored;
    }
    IPluginV3* copy = plugin->clone();
    check(copy != nullptr && std::strcmp(static_cast<IPluginV3OneCore*>(copy->getCapabilityInterface(
                                             PluginCapabilityType::kCORE))->getPluginName(), "MaskedSparseConv") == 0,
        "clone");
    delete copy;
    delete plugin;

    IPluginV3* gather = gatherCreator->createPlugin("g", nullptr, TensorRTPhase::kBUILD);
    check(gather != nullptr, "MVGather created");
    if (gather != nullptr)
    {
        auto* gr = static_cast<IPluginV3OneRuntime*>(gather->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        std::vector<PluginTensorDesc> gio{desc({1, 5, 8, 12}, DataType::kFLOAT), desc({96}, DataType::kINT64),
            desc({8, 12}, DataType::kBOOL), desc({1, 5, 8, 12}, DataType::kFLOAT)};
        check(gr->onShapeChange(gio.data(), 3, gio.data() + 3, 1) == 0, "MVGather shapes accepted");
        gio[1].dims = dims({95});
        check(gr->onShapeChange(gio.data(), 3, gio.data() + 3, 1) != 0, "MVGather short index refused");
        delete gather;
    }
    std::printf("%d passed, %d failed\n", gChecks - gFailures, gFailures);
    return gFailures == 0 ? 0 : 1;
}

int kernelsMode(char const* golden);
} // namespace

int main(int argc, char** argv)
{
    if (argc == 3 && std::strcmp(argv[1], "plugins") == 0)
        return pluginsMode(argv[2]);
    if (argc == 3 && std::strcmp(argv[1], "kernels") == 0)
        return kernelsMode(argv[2]);
    std::fprintf(stderr, "usage: %s plugins LIBRARY.so | kernels GOLDEN_DIR\n", argv[0]);
    return 1;
}

namespace
{
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
            auto m = meta(dir);
            bool ok = m["op"] == "MVGather" ? gatherCase(dir, m) : convCase(dir, m);
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
