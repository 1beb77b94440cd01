// MVGather's self-test checks (run by fluxshard_plugins_selftest; harness in selftest/).
#include "mvGatherKernel.h"
#include "mvGatherPlugin.h"
#include "selftest.h"

#include <cstdio>
#include <cstring>

using namespace nvinfer1;
using fluxshard::MvGatherPlugin;

namespace selftest
{
namespace
{
void pluginChecks(IPluginCreatorV3One* creator)
{
    check(std::strcmp(creator->getPluginVersion(), MvGatherPlugin::kVersion) == 0, "MVGather version");
    check(creator->getFieldNames()->nbFields == 0, "MVGather declares no fields");
    IPluginV3* gather = creator->createPlugin("g", nullptr, TensorRTPhase::kBUILD);
    check(gather != nullptr, "MVGather created");
    if (gather == nullptr)
        return;
    auto* runtime = capability<IPluginV3OneRuntime>(gather, PluginCapabilityType::kRUNTIME);
    std::vector<PluginTensorDesc> io{desc({1, 5, 8, 12}, DataType::kFLOAT), desc({96}, DataType::kINT64),
        desc({8, 12}, DataType::kBOOL), desc({1, 5, 8, 12}, DataType::kFLOAT)};
    check(runtime->onShapeChange(io.data(), 3, io.data() + 3, 1) == 0, "MVGather shapes accepted");
    io[1].dims = dims({95});
    check(runtime->onShapeChange(io.data(), 3, io.data() + 3, 1) != 0, "MVGather short index refused");
    delete gather;
}

bool goldenCase(std::string const& dir, Meta& m)
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

ChecksRegistration const gRegistration{{MvGatherPlugin::kName, pluginChecks, goldenCase}};
} // namespace
} // namespace selftest
