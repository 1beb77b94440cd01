"""The one specification of FluxShard's two graph ops. The torch executor (fluxshard.sparse.ops),
the ONNX local-function bodies (fluxshard.graph.functions) and the TensorRT plugins all implement
exactly this; ``tests/test_graph_ops.py`` checks the first two against each other.

MVGather(cache, field_index, invalid) -> gathered
    cache        float32 (N, C, H, W)   a layer's output from the frame its endpoint last ran on
    field_index  int64   (H*W,)         flat source position of every output position:
                                        (y + dy_s) * W + (x + dx_s), clamped into [0, H*W)
    invalid      bool    (H, W)         positions whose source is outside the map or whose
                                        displacement is not coherent at this grid (RFAP Cond. 2)
    gathered[n, c, y, x] = cache[n, c, field_index[y*W + x]] where not invalid, else 0.
    The grid field d_s = d / s comes from the input-level field d (integer pixels, rounded half
    away from zero) for a layer of cumulative stride s; Cond. 2 holds at a position when every
    input-level vector in its s x s window is equal and divisible by s.

MaskedSparseConv(x, recompute, gathered, invalid, W, b; strides, pads, group, activation,
                 threshold, tile) -> (y, changed)
    x          float32 (1, Cin, Hi, Wi)  the assembled input of the layer
    recompute  bool    (Ho, Wo)          output positions that must be recomputed: the input's
                                         changed mask dilated by the kernel radius (through the
                                         stride), RFAP Cond. 1 failures, invalid gathered positions
    gathered   float32 (1, Cout, Ho, Wo) MVGather of this layer's cache
    invalid    bool    (Ho, Wo)          MVGather's invalid mask at this layer's grid (inside
                                         recompute); all False when nothing moved
    W, b                                 BN-fused weight (Cout, Cin / group, k, k) and bias (Cout)
    strides    ints [s, s]; pads ints [top, left, bottom, right]; group int: ordinary Conv
               semantics (ONNX Conv attribute names), zero padding
    activation "silu" | "none"
    threshold  float >= 0                truncation: tau / ||W||_1 at activation outputs, else 0
    tile       int                       output tile edge; an output tile containing any recompute
                                         position is computed whole (with its input halo);
                                         0 (or 1) = per position: exactly the recompute positions
    computed = recompute, widened to whole tile x tile tiles (tiles start at the map's origin)
    fresh = act(conv(x, W, b)) on every computed position
    changed = computed and (max_c |fresh - gathered| > threshold, or invalid): an invalid
              position always takes its fresh value, so what its gathered value holds (0 by
              MVGather; executors that skip zeroing may leave anything) never matters
    y = fresh where changed, gathered elsewhere
    With threshold 0, y equals the dense conv on every position whose receptive field is
    unchanged and RFAP-consistent (exact reuse, v1 Eq. 3), and on every recomputed position up to
    the float rounding of a differently-shaped conv call (see tests/test_executor.py).

||W||_1 (truncation scale) is the largest L1 norm over output channels of the fused kernel: the
Lipschitz bound of one output channel against a max-norm input change (v1 Eq. 4).
"""

OPS = ("MVGather", "MaskedSparseConv")
ACTIVATIONS = ("silu", "none")


def l1_norm(weight) -> float:
    """||W||_1 of a (Cout, Cin / group, k, k) kernel (torch tensor or numpy array): the largest
    L1 norm over output channels, the truncation scale of every executor."""
    w = weight.detach().cpu().numpy() if hasattr(weight, "detach") else weight
    return float(abs(w.reshape(w.shape[0], -1)).sum(1).max())
