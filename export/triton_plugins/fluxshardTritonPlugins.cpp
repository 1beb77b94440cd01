// libfluxshard_trt_triton.so: makes Triton's TensorRT backend know the FluxShard plugins.
//
// The backend's `--backend-config=tensorrt,plugins=LIB.so` only dlopens LIB: a library that
// registers its creators from static initialisers works that way, but libfluxshard_trt_plugins.so
// offers them through the entry points TensorRT's IPluginRegistry::loadLibrary looks up
// (getCreators, setLoggerFinder), which a plain dlopen never calls. This library, named in
// `plugins=` instead, asks the registry of the TensorRT runtime already in the process (the
// backend's libnvinfer, or a lean / dispatch runtime) to load the plugin library: the one named
// by FLUXSHARD_TRT_PLUGINS, else libfluxshard_trt_plugins.so in this library's own folder.
// Built with the TensorRT headers alone (no libnvinfer to link against): the registry is found
// with dlsym in the process. Failures are printed to stderr; the engine's deserialisation then
// names the missing plugin.
#include <NvInferRuntime.h>

#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace
{
using GetPluginRegistry = nvinfer1::IPluginRegistry* (*) ();

std::string pluginLibrary()
{
    if (char const* named = std::getenv("FLUXSHARD_TRT_PLUGINS"))
        return named;
    Dl_info self{};
    if (dladdr(reinterpret_cast<void*>(&pluginLibrary), &self) != 0 && self.dli_fname != nullptr)
    {
        std::string path(self.dli_fname);
        std::string::size_type slash = path.rfind('/');
        return (slash == std::string::npos ? std::string() : path.substr(0, slash + 1))
            + "libfluxshard_trt_plugins.so";
    }
    return "libfluxshard_trt_plugins.so";
}

GetPluginRegistry findRegistry()
{
    // RTLD_NOLOAD: only a runtime the process has loaded already (the one that will
    // deserialise the engine), however it was loaded (RTLD_LOCAL included)
    for (char const* runtime : {"libnvinfer.so.10", "libnvinfer_lean.so.10", "libnvinfer_dispatch.so.10",
             "libnvinfer.so", "libnvinfer_lean.so", "libnvinfer_dispatch.so"})
    {
        if (void* handle = dlopen(runtime, RTLD_NOW | RTLD_NOLOAD))
        {
            if (void* symbol = dlsym(handle, "getPluginRegistry"))
                return reinterpret_cast<GetPluginRegistry>(symbol);
        }
    }
    return reinterpret_cast<GetPluginRegistry>(dlsym(RTLD_DEFAULT, "getPluginRegistry"));
}

__attribute__((constructor)) void registerFluxShardPlugins()
{
    GetPluginRegistry getRegistry = findRegistry();
    nvinfer1::IPluginRegistry* registry = getRegistry != nullptr ? getRegistry() : nullptr;
    if (registry == nullptr)
    {
        std::fprintf(stderr,
            "fluxshard plugins: no TensorRT runtime is loaded in this process: load "
            "libfluxshard_trt_plugins.so with IPluginRegistry::loadLibrary instead\n");
        return;
    }
    std::string const library = pluginLibrary();
    if (registry->loadLibrary(library.c_str()) == nullptr)
        std::fprintf(stderr, "fluxshard plugins: TensorRT could not load %s\n", library.c_str());
}
} // namespace
