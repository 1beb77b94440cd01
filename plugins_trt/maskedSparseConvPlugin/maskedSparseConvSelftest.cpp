// MaskedSparseConv's self-test checks (run by fluxshard_plugins_selftest; harness in selftest/).
#include "maskedSparseConvKernel.h"
#include "maskedSparseConvPlugin.h"
#include "selftest.h"

#include <cmath>
#include <cstdio>
#include <cstring>

using namespace nvinfer1;
using fluxshard::MaskedSparseConvPlugin;

namespace selftest
{
namespace
{
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

// What the engine stores (getFieldsToSerialize) recreates the plugin, whose fields are the same.
void serializedFieldsChecks(IPluginCreatorV3One* creator, IPluginV3OneRuntime* runtime)
{
    PluginFieldCollection const* saved = runtime->getFieldsToSerialize();
    IPluginV3* restored = creator->createPlugin("restored", saved, TensorRTPhase::kRUNTIME);
    check(saved != nullptr && saved->nbFields == 7 && restored != nullptr, "serialized fields recreate the plugin");
    if (restored == nullptr)
        return;
    PluginFieldCollection const* again
        = capability<IPluginV3OneRuntime>(restored, PluginCapabilityType::kRUNTIME)->getFieldsToSerialize();
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

void pluginChecks(IPluginCreatorV3One* creator)
{
    check(std::strcmp(creator->getPluginVersion(), MaskedSparseConvPlugin::kVersion) == 0, "MaskedSparseConv version");
    check(creator->getFieldNames()->nbFields == 7, "MaskedSparseConv declares 7 fields");

    // attribute validation: what the spec does not define is refused
    ConvFields bad;
    std::strcpy(bad.activation, "relu");
    check(create(creator, bad) == nullptr, "activation relu refused");
    bad = ConvFields{};
    bad.strides[0] = 0, bad.strides[1] = 0;
    check(create(creator, bad) == nullptr, "stride 0 refused");
    bad = ConvFields{};
    bad.kernel[1] = 1;
    check(create(creator, bad) == nullptr, "non-square kernel refused");

    IPluginV3* plugin = create(creator, ConvFields{});
    check(plugin != nullptr, "MaskedSparseConv created");
    if (plugin == nullptr)
        return;
    auto* core = capability<IPluginV3OneCore>(plugin, PluginCapabilityType::kCORE);
    auto* build = capability<IPluginV3OneBuild>(plugin, PluginCapabilityType::kBUILD);
    auto* runtime = capability<IPluginV3OneRuntime>(plugin, PluginCapabilityType::kRUNTIME);
    check(std::strcmp(core->getPluginName(), MaskedSparseConvPlugin::kName) == 0, "plugin name");
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

    serializedFieldsChecks(creator, runtime);
    IPluginV3* copy = plugin->clone();
    check(copy != nullptr
            && std::strcmp(capability<IPluginV3OneCore>(copy, PluginCapabilityType::kCORE)->getPluginName(),
                   MaskedSparseConvPlugin::kName)
                == 0,
        "clone");
    delete copy;
    delete plugin;
}

bool goldenCase(std::string const& dir, Meta& m)
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

ChecksRegistration const gRegistration{{MaskedSparseConvPlugin::kName, pluginChecks, goldenCase}};
} // namespace
} // namespace selftest
