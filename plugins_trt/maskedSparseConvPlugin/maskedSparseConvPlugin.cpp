// MaskedSparseConv: conv (+ activation) on the recompute positions, truncation against the
// gathered cache, assembly (see maskedSparseConvPlugin.h).
#include "maskedSparseConvPlugin.h"

using namespace nvinfer1;

namespace fluxshard
{

ConvAttributes ConvAttributes::parse(PluginFieldCollection const* fc)
{
    FieldReader r(fc);
    ConvAttributes a;
    a.kernelShape = r.ints("kernel_shape", 2);
    a.strides = r.ints("strides", 2, {1, 1});
    a.pads = r.ints("pads", 4, {0, 0, 0, 0});
    a.group = r.integer("group", 1);
    a.activation = r.text("activation", "silu");
    a.threshold = r.real("threshold", 0.F);
    a.tile = r.integer("tile", 0);
    if (a.kernelShape[0] != a.kernelShape[1] || a.kernelShape[0] < 1)
        throw std::invalid_argument("kernel_shape must be square and positive");
    if (a.strides[0] != a.strides[1] || a.strides[0] < 1)
        throw std::invalid_argument("strides must be equal and positive");
    if (a.pads[0] != a.pads[2] || a.pads[1] != a.pads[3] || a.pads[0] < 0 || a.pads[1] < 0)
        throw std::invalid_argument("pads must be symmetric and >= 0");
    if (a.group < 1 || a.tile < 0 || !(a.threshold >= 0.F))
        throw std::invalid_argument("group >= 1, tile >= 0 and threshold >= 0 are required");
    if (a.activation != "silu" && a.activation != "none")
        throw std::invalid_argument("activation must be silu or none, got " + a.activation);
    return a;
}

std::vector<PluginField> ConvAttributes::fields() const
{
    return {PluginField("kernel_shape", kernelShape.data(), PluginFieldType::kINT32, 2),
        PluginField("strides", strides.data(), PluginFieldType::kINT32, 2),
        PluginField("pads", pads.data(), PluginFieldType::kINT32, 4),
        PluginField("group", &group, PluginFieldType::kINT32, 1), stringField("activation", activation),
        PluginField("threshold", &threshold, PluginFieldType::kFLOAT32, 1),
        PluginField("tile", &tile, PluginFieldType::kINT32, 1)};
}

void MaskedSparseConvPlugin::outputShapes(DimsExprs const* inputs, DimsExprs* outputs) const noexcept
{
    outputs[0] = inputs[2]; // y: shaped like the gathered cache
    outputs[1] = inputs[1]; // changed: shaped like recompute
}

size_t MaskedSparseConvPlugin::getWorkspaceSize(
    DynamicPluginTensorDesc const* in, int32_t nbInputs_, DynamicPluginTensorDesc const*, int32_t) const noexcept
{
    ConvGeometry g{};
    if (nbInputs_ != nbInputs() || !geometry(in[0].max, in[2].max, g))
        return 0;
    return maskedSparseConvWorkspace(g);
}

bool MaskedSparseConvPlugin::acceptShapes(PluginTensorDesc const* in) noexcept
{
    if (!geometry(in[0].dims, in[2].dims, mGeometry))
        return false;
    ConvAttributes const& a = attributes();
    Dims const& w = in[4].dims;
    bool ok = w.nbDims == 4 && w.d[0] == mGeometry.cout && w.d[1] * a.group == mGeometry.cin
        && w.d[2] == a.kernelShape[0] && w.d[3] == a.kernelShape[1] && volume(in[5].dims) == mGeometry.cout
        && volume(in[1].dims) == int64_t{mGeometry.hout} * mGeometry.wout
        && volume(in[3].dims) == int64_t{mGeometry.hout} * mGeometry.wout
        && mGeometry.cout % a.group == 0 && mGeometry.cin % a.group == 0;
    if (!ok)
        logError(std::string(kName) + ": input shapes do not match the conv's attributes");
    return ok;
}

cudaError_t MaskedSparseConvPlugin::launch(
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    return launchMaskedSparseConv(mGeometry, static_cast<float const*>(inputs[0]),
        static_cast<bool const*>(inputs[1]), static_cast<float const*>(inputs[2]),
        static_cast<bool const*>(inputs[3]), static_cast<float const*>(inputs[4]),
        static_cast<float const*>(inputs[5]), static_cast<float*>(outputs[0]), static_cast<bool*>(outputs[1]),
        workspace, stream);
}

// x (1, Cin, Hi, Wi) and gathered (1, Cout, Ho, Wo), checked against the conv arithmetic.
bool MaskedSparseConvPlugin::geometry(Dims const& x, Dims const& gathered, ConvGeometry& g) const noexcept
{
    if (x.nbDims != 4 || gathered.nbDims != 4 || x.d[0] != 1 || gathered.d[0] != 1)
        return false;
    ConvAttributes const& a = attributes();
    g.cin = static_cast<int32_t>(x.d[1]);
    g.hin = static_cast<int32_t>(x.d[2]);
    g.win = static_cast<int32_t>(x.d[3]);
    g.cout = static_cast<int32_t>(gathered.d[1]);
    g.hout = static_cast<int32_t>(gathered.d[2]);
    g.wout = static_cast<int32_t>(gathered.d[3]);
    g.kernel = a.kernelShape[0];
    g.stride = a.strides[0];
    g.padTop = a.pads[0];
    g.padLeft = a.pads[1];
    g.group = a.group;
    g.silu = a.activation == "silu" ? 1 : 0;
    g.threshold = a.threshold;
    g.tile = a.tile;
    return g.hout == (g.hin + 2 * g.padTop - g.kernel) / g.stride + 1
        && g.wout == (g.win + 2 * g.padLeft - g.kernel) / g.stride + 1;
}

REGISTER_FLUXSHARD_PLUGIN(MaskedSparseConvPlugin);

} // namespace fluxshard
