// The library's creator list and logger: each plugin's source registers its creator
// (REGISTER_FLUXSHARD_PLUGIN in pluginBase.h); pluginRegistry.cpp holds the two entry points
// TensorRT's registry looks up when it loads the library (getCreators, setLoggerFinder).
#pragma once

#include <NvInferRuntime.h>

#include <string>

namespace fluxshard
{

// Logs through TensorRT's logger once the library loader has handed us its finder
// (setLoggerFinder), else to stderr.
void logError(std::string const& message) noexcept;

// Adds a creator to what getCreators returns (listed by plugin name, then version).
void registerCreator(nvinfer1::IPluginCreatorV3One* creator) noexcept;

// A static object of this type registers one creator while the library loads.
template <typename Creator>
struct CreatorRegistration
{
    CreatorRegistration() noexcept
    {
        static Creator creator;
        registerCreator(&creator);
    }
};

} // namespace fluxshard
