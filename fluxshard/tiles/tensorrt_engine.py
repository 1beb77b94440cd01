"""The tile executor's maps engine on TensorRT (GPU path).

One engine file, built by polygraphy from ``export_raw_maps_onnx``'s dynamic ONNX, carries several
optimization profiles: small crops in large batches, every crop size in small batches, and the whole
padded frame at batch 1, so each batched call runs on kernels tuned near its own shape. Which
profile covers which (batch, height, width), and which one a call picks, is plain Python
(``plan_profiles``, ``choose_profile``) and is tested without a GPU; ``tensorrt`` is imported only
when an engine is built or loaded.

    python3 -m fluxshard.tiles.tensorrt_engine export --out raw-maps.onnx
    python3 -m fluxshard.tiles.tensorrt_engine build --onnx raw-maps.onnx --out maps.engine \\
        --frame 384x640 --max-batch 8
    python3 -m fluxshard.tiles.tensorrt_engine bench --engine maps.engine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from fluxshard.tiles.crops import BUCKETS, SNAP
from fluxshard.tiles.raw_maps import RAW_MAP_OUTPUTS

INPUT_NAME = "images"
DEFAULT_GROUP_SIDES = (128, 256)  # crops up to these sides get their own large-batch profiles
DEFAULT_ONNX = Path(".cache/tiles_trt/yolo11n-raw-maps.onnx")


class ShapeNotCovered(ValueError):
    """A call's (batch, height, width) lies outside every profile of the engine."""


@dataclass(frozen=True)
class ProfileSpec:
    """One optimization profile as (batch, height, width) bounds of the ``images`` input."""

    name: str
    min: tuple[int, int, int]
    opt: tuple[int, int, int]
    max: tuple[int, int, int]

    def covers_size(self, h: int, w: int) -> bool:
        return self.min[1] <= h <= self.max[1] and self.min[2] <= w <= self.max[2]

    def covers(self, b: int, h: int, w: int) -> bool:
        return self.min[0] <= b <= self.max[0] and self.covers_size(h, w)

    def nchw(self, which: str) -> tuple[int, int, int, int]:
        b, h, w = getattr(self, which)
        return (b, 3, h, w)

    def describe(self) -> str:
        (b0, h0, w0), (b1, h1, w1) = self.min, self.max
        return f"{self.name}: batch {b0}-{b1}, {h0}-{h1} x {w0}-{w1}"


def crop_sides(limit: int, buckets: Sequence[int] = BUCKETS) -> tuple[int, ...]:
    """Every side a crop can have on a padded frame side of ``limit`` px: the buckets clamped to
    the side, and the side itself (what ``crops.plan_crops`` produces)."""
    return tuple(sorted({min(b, limit) for b in buckets} | {limit}))


def plan_profiles(frame_hw: tuple[int, int], max_batch: int = 8,
                  buckets: Sequence[int] = BUCKETS,
                  group_sides: Sequence[int] = DEFAULT_GROUP_SIDES,
                  large_batch: int | None = None) -> list[ProfileSpec]:
    """The engine's profiles for a padded frame of ``frame_hw``:

    - ``crops<=S`` for each S in ``group_sides``: crops whose sides are at most S, batch 1 to
      ``max_batch``, tuned at the group's largest crop and half the batch;
    - ``crops``: every crop size up to the whole frame, batch 1 to ``large_batch`` (a quarter of
      ``max_batch`` by default: large crops fill the area budget with few of them);
    - ``frame``: exactly the whole frame at batch 1 (dense key frames and refreshes).

    Bigger batches than a profile allows are split by the engine, so batch limits cost speed,
    never coverage."""
    fh, fw = frame_hw
    if fh <= 0 or fw <= 0 or fh % SNAP or fw % SNAP:
        raise ValueError(f"the padded frame must be positive multiples of {SNAP}, got {fh}x{fw}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    large_batch = max(1, max_batch // 4) if large_batch is None else large_batch
    if not 1 <= large_batch <= max_batch:
        raise ValueError(f"large_batch must be in 1..{max_batch}, got {large_batch}")
    hs, ws = crop_sides(fh, buckets), crop_sides(fw, buckets)
    smallest = (1, hs[0], ws[0])
    profiles: list[ProfileSpec] = []
    for edge in sorted(group_sides):
        gh, gw = [s for s in hs if s <= edge], [s for s in ws if s <= edge]
        if not gh or not gw or (gh[-1], gw[-1]) == (fh, fw):
            continue  # nothing this small, or the group is the whole frame: `crops` covers it
        if profiles and profiles[-1].max[1:] == (gh[-1], gw[-1]):
            continue  # a small frame: the previous group already reaches as far
        profiles.append(ProfileSpec(f"crops<={edge}", smallest,
                                    (max(1, max_batch // 2), gh[-1], gw[-1]),
                                    (max_batch, gh[-1], gw[-1])))
    # tuned at the largest true crop (a side below the frame's), where large crops spend most
    opt_h = max([s for s in hs if s < fh] or [fh])
    opt_w = max([s for s in ws if s < fw] or [fw])
    profiles.append(ProfileSpec("crops", smallest, (1, opt_h, opt_w), (large_batch, fh, fw)))
    profiles.append(ProfileSpec("frame", (1, fh, fw), (1, fh, fw), (1, fh, fw)))
    return profiles


def _size_span(p: ProfileSpec) -> int:
    return (p.max[1] - p.min[1] + 1) * (p.max[2] - p.min[2] + 1)


def choose_profile(profiles: Sequence[ProfileSpec], shape: tuple[int, int, int]) -> int:
    """Index of the profile a (batch, height, width) call runs on: among those covering the
    size, one that takes the whole batch, the tightest such (tuned nearest the call); when none
    takes the whole batch, the one with the largest batch (fewest chunks)."""
    b, h, w = shape
    if b < 1:
        raise ValueError(f"empty batch {shape}")
    fitting = [i for i, p in enumerate(profiles) if p.covers_size(h, w)]
    if not fitting:
        listed = "; ".join(p.describe() for p in profiles)
        raise ShapeNotCovered(f"no optimization profile covers batch {b} of {h}x{w} crops "
                              f"(profiles: {listed}); rebuild the engine for this frame size")
    whole = [i for i in fitting if profiles[i].covers(b, h, w)]
    if whole:
        return min(whole, key=lambda i: (_size_span(profiles[i]), -profiles[i].max[0], i))
    return min(fitting, key=lambda i: (-profiles[i].max[0], _size_span(profiles[i]), i))


# -- build --------------------------------------------------------------------------------------

def polygraphy_profiles(profiles: Sequence[ProfileSpec]):
    """The plan as polygraphy ``Profile`` objects (profile index = position in the plan)."""
    from polygraphy.backend.trt import Profile
    return [Profile().add(INPUT_NAME, min=p.nchw("min"), opt=p.nchw("opt"), max=p.nchw("max"))
            for p in profiles]


def build_config(profiles: Sequence[ProfileSpec], *, tf32: bool = True, fp16: bool = False,
                 opt_level: int | None = None):
    """polygraphy's lazy ``CreateConfig`` for the plan (nothing of TensorRT runs until the build).
    TF32 is TensorRT's own default; polygraphy turns it off unless asked."""
    from polygraphy.backend.trt import CreateConfig
    return CreateConfig(tf32=tf32, fp16=fp16, profiles=polygraphy_profiles(profiles),
                        builder_optimization_level=opt_level)


def sidecar_path(engine_path: str | Path) -> Path:
    return Path(str(engine_path) + ".json")


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RuntimeError(
            "the `tensorrt` Python module (full TensorRT, not tensorrt-lean) is not installed: "
            "its wheels are not on PyPI as binaries for this project's machines; use an image "
            "that has TensorRT (pip `tensorrt-cu12`/`tensorrt-cu13` from NVIDIA's index)") from e
    return trt


def tensorrt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def build_engine(onnx_path: str | Path, engine_path: str | Path, frame_hw: tuple[int, int],
                 max_batch: int = 8, *, fp16: bool = False, tf32: bool = True,
                 opt_level: int | None = None,
                 group_sides: Sequence[int] = DEFAULT_GROUP_SIDES) -> Path:
    """Build and save the engine and its sidecar (``ENGINE.json``: the plan with profile names,
    the frame, the precision and the TensorRT version)."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX {onnx_path} not found: write it with "
                                f"`python3 -m fluxshard.tiles.tensorrt_engine export --out {onnx_path}`")
    profiles = plan_profiles(frame_hw, max_batch, group_sides=group_sides)
    trt = _import_tensorrt()
    if fp16 and tensorrt_major(trt) >= 11:
        raise RuntimeError(f"TensorRT {trt.__version__} builds strongly typed networks only (no "
                           "FP16 builder flag): FP16 needs an FP16 ONNX; build FP32/TF32 instead")
    from polygraphy.backend.trt import engine_from_network, network_from_onnx_path, save_engine
    config = build_config(profiles, tf32=tf32, fp16=fp16, opt_level=opt_level)
    engine = engine_from_network(network_from_onnx_path(str(onnx_path)), config=config)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    save_engine(engine, path=str(engine_path))
    meta = {"onnx": str(onnx_path), "frame": list(frame_hw), "max_batch": max_batch,
            "fp16": fp16, "tf32": tf32, "tensorrt": str(trt.__version__),
            "profiles": [asdict(p) for p in profiles]}
    sidecar_path(engine_path).write_text(json.dumps(meta, indent=1))
    return engine_path


# -- run ----------------------------------------------------------------------------------------

def _torch_dtype(trt, dtype):
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.INT32: torch.int32}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dtype not in table:
        raise RuntimeError(f"unsupported TensorRT I/O dtype {dtype}")
    return table[dtype]


class TensorRTMapsEngine:
    """A maps engine (``(B, 3, H, W)`` float -> the head's three raw maps) on a TensorRT engine
    built by ``build_engine``. Each profile gets its own execution context, set once, so calls
    never switch profiles. TensorRT runs on a stream of its own (enqueueV3 on the legacy default
    stream adds synchronizations) that waits for torch's current stream and is waited for by it,
    so calls stay ordered with the torch code around them. Maps come back on the input's device."""

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, device: str | torch.device | None = None,
                 channels: int | None = None):
        path = Path(engine_path)
        if not path.is_file():
            raise FileNotFoundError(f"TensorRT engine {path} not found: build it with "
                                    "scripts/build_tiles_trt.sh (on a machine with a GPU and TensorRT)")
        if not torch.cuda.is_available():
            raise RuntimeError("the TensorRT maps engine needs a CUDA device; torch sees none "
                               "(use the onnxruntime or torch engine on CPU)")
        trt = _import_tensorrt()
        self._trt = trt
        self.device = torch.device(device if device is not None else "cuda")
        if self.device.type != "cuda":
            raise ValueError(f"TensorRT runs on a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.path = path
        with torch.cuda.device(self.device):
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise RuntimeError(f"TensorRT {trt.__version__} could not load {path}: an engine runs "
                               "only with the TensorRT version and GPU kind it was built with")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if inputs != [INPUT_NAME] or len(outputs) != len(RAW_MAP_OUTPUTS):
            raise RuntimeError(f"{path} is not a raw-maps engine: inputs {inputs}, outputs {outputs}")
        self.output_names = ([o for o in RAW_MAP_OUTPUTS if o in outputs]
                             if set(outputs) == set(RAW_MAP_OUTPUTS) else outputs)
        self._input_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(INPUT_NAME))
        self._output_dtypes = {o: _torch_dtype(trt, self._engine.get_tensor_dtype(o))
                               for o in self.output_names}
        self.profiles = self._read_profiles()
        if channels is not None:
            got = self._engine.get_tensor_shape(self.output_names[0])[1]
            if got not in (-1, channels):
                raise ValueError(f"{path} gives {got}-channel maps; the model's head has {channels}")
        self._contexts: dict[int, object] = {}
        self._stream = torch.cuda.Stream(self.device)

    def _read_profiles(self) -> list[ProfileSpec]:
        """The profiles as the engine has them (the truth), named from the sidecar when it
        describes the same shapes."""
        shapes = []
        for i in range(self._engine.num_optimization_profiles):
            lo, opt, hi = (tuple(int(d) for d in s)
                           for s in self._engine.get_tensor_profile_shape(INPUT_NAME, i))
            shapes.append(tuple((s[0], s[2], s[3]) for s in (lo, opt, hi)))
        names = [f"profile {i}" for i in range(len(shapes))]
        meta_path = sidecar_path(self.path)
        if meta_path.is_file():
            planned = json.loads(meta_path.read_text()).get("profiles", [])
            if [(tuple(p["min"]), tuple(p["opt"]), tuple(p["max"])) for p in planned] == shapes:
                names = [p["name"] for p in planned]
        return [ProfileSpec(n, *s) for n, s in zip(names, shapes)]

    def _context(self, index: int, stream: torch.cuda.Stream):
        ctx = self._contexts.get(index)
        if ctx is None:
            ctx = self._engine.create_execution_context()
            if ctx is None:
                raise RuntimeError(f"TensorRT could not create an execution context for profile "
                                   f"{self.profiles[index].name} (out of GPU memory?)")
            if not ctx.set_optimization_profile_async(index, stream.cuda_stream):
                raise RuntimeError(f"could not select profile {self.profiles[index].name}")
            self._contexts[index] = ctx
        return ctx

    def profile_for(self, shape: tuple[int, int, int]) -> ProfileSpec:
        return self.profiles[choose_profile(self.profiles, shape)]

    def _run(self, index: int, x: torch.Tensor) -> list[torch.Tensor]:
        """Enqueue one chunk on the engine's stream; the tensors are allocated on the current
        stream and recorded on the engine's, so the allocator never hands them out early."""
        stream = self._stream
        ctx = self._context(index, stream)
        if not ctx.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise ShapeNotCovered(f"profile {self.profiles[index].describe()} refused {tuple(x.shape)}")
        ctx.set_tensor_address(INPUT_NAME, x.data_ptr())
        outs = []
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._output_dtypes[name], device=self.device)
            ctx.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {tuple(x.shape)} on profile "
                               f"{self.profiles[index].name}")
        for t in (x, *outs):
            t.record_stream(stream)
        return outs

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got {tuple(x.shape)}")
        b, _, h, w = x.shape
        index = choose_profile(self.profiles, (b, h, w))
        per_call = self.profiles[index].max[0]
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream(self.device)
            xd = x.detach().to(self.device, self._input_dtype).contiguous()
            self._stream.wait_stream(current)
            parts = [self._run(index, chunk) for chunk in xd.split(per_call)]
            current.wait_stream(self._stream)
        maps = [p[0] if len(parts) == 1 else torch.cat(p) for p in zip(*parts)]
        return [m.to(x.device) for m in maps] if x.device != self.device else maps


# -- timing -------------------------------------------------------------------------------------

def bench_shapes(frame_hw: tuple[int, int], max_batch: int = 8) -> list[tuple[int, int, int]]:
    """The whole frame at batch 1, then square crops of each bucket side in batches covering
    about half the frame (what a busy frame's crop batches look like)."""
    fh, fw = frame_hw
    shapes = [(1, fh, fw)]
    for s in crop_sides(min(fh, fw)):
        if (s, s) != (fh, fw):
            shapes.append((min(max_batch, max(1, fh * fw // (2 * s * s))), s, s))
    return shapes


def time_calls(engine: Callable, shapes: Sequence[tuple[int, int, int]], device: torch.device,
               reps: int = 20, warmup: int = 3) -> list[dict]:
    """Median milliseconds per call of each (batch, height, width), inputs on ``device`` (CUDA
    events on a GPU, the wall clock elsewhere)."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for b, h, w in shapes:
        x = torch.rand((b, 3, h, w), generator=gen).to(device)
        for _ in range(warmup):
            engine(x)
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                engine(x)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                engine(x)
                times.append((time.perf_counter() - t0) * 1e3)
        rows.append({"batch": b, "h": h, "w": w, "ms": sorted(times)[len(times) // 2]})
    return rows


def timing_table(rows: Sequence[dict], profile_of: Callable | None = None) -> str:
    """Markdown table: each call against the first row (the whole frame): its share of the
    frame's area, its time ratio, and the time per pixel relative to the whole frame
    (1.0 = crops cost as much per pixel as the frame)."""
    full = rows[0]
    full_area = full["batch"] * full["h"] * full["w"]
    lines = ["| call | profile | ms | area / frame | ms / frame ms | per-pixel cost vs frame |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        area = r["batch"] * r["h"] * r["w"] / full_area
        ratio = r["ms"] / full["ms"] if full["ms"] > 0 else float("nan")
        prof = profile_of((r["batch"], r["h"], r["w"])).name if profile_of else "-"
        lines.append(f"| {r['batch']} x {r['h']}x{r['w']} | {prof} | {r['ms']:.3f} | {area:.3f} "
                     f"| {ratio:.3f} | {ratio / area:.2f} |")
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------

def parse_frame(text: str) -> tuple[int, int]:
    """'384x640' (height x width of the padded frame) -> (384, 640)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"frame size as HxW (e.g. 384x640), got {text!r}") from None
    if h <= 0 or w <= 0 or h % SNAP or w % SNAP:
        raise argparse.ArgumentTypeError(f"frame sides must be positive multiples of {SNAP}, got {text!r}")
    return h, w


def parse_sides(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python3 -m fluxshard.tiles.tensorrt_engine",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write the raw-maps ONNX (dynamic batch and size)")
    ex.add_argument("--out", type=Path, default=DEFAULT_ONNX)
    ex.add_argument("--weights", default=None, help="checkpoint (default: the embedded demo detector)")
    for name, text in (("plan", "print the optimization profiles"),
                       ("build", "build the engine with polygraphy (needs a GPU and TensorRT)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--frame", type=parse_frame, default=(384, 640), help="padded frame HxW")
        p.add_argument("--max-batch", type=int, default=8)
        p.add_argument("--groups", type=parse_sides, default=DEFAULT_GROUP_SIDES,
                       help="crop sides that end a large-batch profile group (comma separated)")
    bd = sub.choices["build"]
    bd.add_argument("--onnx", type=Path, default=DEFAULT_ONNX)
    bd.add_argument("--out", type=Path, default=None,
                    help="engine file (default: next to the ONNX, named by frame and batch)")
    bd.add_argument("--fp16", action="store_true", help="allow FP16 kernels (TensorRT 10 only)")
    bd.add_argument("--no-tf32", dest="tf32", action="store_false", help="strict FP32 kernels")
    bd.add_argument("--opt-level", type=int, default=None, help="builder optimization level 0-5")
    bn = sub.add_parser("bench", help="time the whole frame against crop batches")
    bn.add_argument("--engine", type=Path, required=True)
    bn.add_argument("--reps", type=int, default=20)
    return ap


def default_engine_path(onnx: Path, frame_hw: tuple[int, int], max_batch: int, fp16: bool) -> Path:
    prec = "fp16" if fp16 else "fp32"
    return onnx.with_name(f"{onnx.stem}-{frame_hw[0]}x{frame_hw[1]}-b{max_batch}-{prec}.engine")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run_command(args)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run_command(args: argparse.Namespace) -> int:
    if args.command == "export":
        from fluxshard.models import load_model
        from fluxshard.tiles.raw_maps import export_raw_maps_onnx
        args.out.parent.mkdir(parents=True, exist_ok=True)
        print(export_raw_maps_onnx(load_model(args.weights, fused=True), args.out))
        return 0
    if args.command == "plan":
        for p in plan_profiles(args.frame, args.max_batch, group_sides=args.groups):
            print(f"{p.describe()}; opt {p.opt}")
        return 0
    if args.command == "build":
        out = args.out or default_engine_path(args.onnx, args.frame, args.max_batch, args.fp16)
        t0 = time.perf_counter()
        build_engine(args.onnx, out, args.frame, args.max_batch, fp16=args.fp16, tf32=args.tf32,
                     opt_level=args.opt_level, group_sides=args.groups)
        print(f"built {out} in {time.perf_counter() - t0:.0f} s")
        return 0
    engine = TensorRTMapsEngine(args.engine)
    meta_path = sidecar_path(args.engine)
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    frame = tuple(meta.get("frame") or engine.profiles[-1].max[1:])
    max_batch = int(meta.get("max_batch") or max(p.max[0] for p in engine.profiles))
    rows = time_calls(engine, bench_shapes(frame, max_batch), engine.device, reps=args.reps)
    print(f"TensorRT {engine._trt.__version__}, {torch.cuda.get_device_name(engine.device)}, "
          f"frame {frame[0]}x{frame[1]}, inputs on the GPU, median of {args.reps} calls")
    print(timing_table(rows, engine.profile_for))
    return 0


if __name__ == "__main__":
    sys.exit(main())
