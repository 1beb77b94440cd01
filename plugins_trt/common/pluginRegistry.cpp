// The creators the plugins registered, and the library entry points TensorRT's plugin registry
// looks up (loadLibrary): getCreators and setLoggerFinder.
#include "pluginRegistry.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <vector>

using namespace nvinfer1;

namespace fluxshard
{
namespace
{
ILoggerFinder* gLoggerFinder = nullptr;

// A function's static, so it exists before the first registration whatever the order in which
// the plugins' sources initialise.
std::vector<IPluginCreatorV3One*>& registered()
{
    static std::vector<IPluginCreatorV3One*> creators;
    return creators;
}
} // namespace

void registerCreator(IPluginCreatorV3One* creator) noexcept
{
    std::vector<IPluginCreatorV3One*>& creators = registered();
    auto before = [](IPluginCreatorV3One const* a, IPluginCreatorV3One const* b) {
        int byName = std::strcmp(a->getPluginName(), b->getPluginName());
        return byName != 0 ? byName < 0 : std::strcmp(a->getPluginVersion(), b->getPluginVersion()) < 0;
    };
    creators.insert(std::upper_bound(creators.begin(), creators.end(), creator, before), creator);
}

void logError(std::string const& message) noexcept
{
    ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
    if (logger != nullptr)
        logger->log(ILogger::Severity::kERROR, message.c_str());
    else
        std::fprintf(stderr, "fluxshard plugins: %s\n", message.c_str());
}

} // namespace fluxshard

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    fluxshard::gLoggerFinder = finder;
}

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
    int32_t& nbCreators)
{
    static std::vector<nvinfer1::IPluginCreatorInterface*> const creators(
        fluxshard::registered().begin(), fluxshard::registered().end());
    nbCreators = static_cast<int32_t>(creators.size());
    return creators.data();
}
