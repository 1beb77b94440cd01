"""Synthetic scenes with exact ground truth: a textured background under camera motion (pan, zoom)
and textured objects of a few visually distinct classes moving independently (they occlude each
other). Each frame comes with boxes, classes, instance masks, object ids and the true per-pixel
backward motion, so the motion layer and the detector can be checked against truth.

`make_clip` renders a scene, encodes it with PyAV (libx264 ``ref=1``, no B-frames, fixed GOP, or
libx265 for HEVC) and saves the ground truth beside the video (``.npz``). Everything is
deterministic for a seed.

Camera model: frame pixel ``x`` shows world point ``c(t) + (x - centre) / z(t)``; objects move in
screen space (integer positions, bouncing off the frame borders) in front of the background.
Motion convention (docs/CONVENTIONS.md): pixel ``x`` of frame t came from ``x + flow(x)`` of t-1.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__version__ = "3"  # bump when rendering or encoding changes (training caches key on it)

CLASS_NAMES: tuple[str, ...] = ("car", "person", "ball", "sign")
CAMERAS = ("pan", "zoom", "pan+zoom", "static")
CODECS = ("libx264", "libx265")
MV_BLOCK = 4  # ground-truth block motion uses the motion layer's block (docs/CONVENTIONS.md)
MIN_VISIBLE_PIXELS = 24  # an object with fewer visible pixels is not labelled in that frame


# Scene seeds: split base + index. The gap makes the ranges disjoint for any realistic set size.
SPLIT_SEED_BASE = {"train": 1_000_000, "heldout": 2_000_000}
MAX_SCENES_PER_SPLIT = 1_000_000
# The motion levels every per-level profile and benchmark measures (the truncation profile, the
# tiles table, the baselines, the executors): level -> synthetic camera
MOTION_LEVELS = {"low": dict(camera="static"), "medium": dict(camera="pan", pan_speed=1.5),
                 "high": dict(camera="pan+zoom", pan_speed=4.0, object_speed=5.0)}
# held-out scenes of the motion levels, apart from the trainer's and bench_accuracy's
HELDOUT_SCENE_OFFSET = 20_000


def scene_seed(split: str, index: int) -> int:
    """The seed of scene ``index`` of a split ("train" or "heldout"): splits never share one."""
    if split not in SPLIT_SEED_BASE:
        raise ValueError(f"split must be one of {list(SPLIT_SEED_BASE)}, got {split!r}")
    if not 0 <= index < MAX_SCENES_PER_SPLIT:
        raise ValueError(f"scene index {index} outside [0, {MAX_SCENES_PER_SPLIT})")
    return SPLIT_SEED_BASE[split] + index


def heldout_spec(level: str, clip: int = 0, *, width: int = 640, height: int = 384,
                 frames: int = 30, levels: dict | None = None) -> "SceneSpec":
    """Held-out clip ``clip`` of a motion level, one key frame: the scenes the truncation
    profile, the tiles table and the baselines all measure. ``levels``: {name: SceneSpec
    overrides} (default :data:`MOTION_LEVELS`); a level's scenes follow its place in it."""
    levels = MOTION_LEVELS if levels is None else levels
    if level not in levels:
        raise ValueError(f"motion level must be one of {list(levels)}, got {level!r}")
    seed = scene_seed("heldout", HELDOUT_SCENE_OFFSET + 100 * list(levels).index(level) + clip)
    return SceneSpec(width=width, height=height, frames=frames, gop=frames, seed=seed,
                     **levels[level])


@dataclass
class SceneSpec:
    width: int = 640
    height: int = 384
    fps: int = 30
    frames: int = 60
    gop: int = 30
    seed: int = 0
    num_objects: int = 5
    camera: str = "pan"
    pan_speed: float = 2.0  # px/frame at zoom 1
    pan_angle: float | None = None  # degrees, 0 = camera moves right; None: drawn from the seed
    zoom_speed: float = 0.004  # relative zoom-in per frame
    object_speed: float = 3.0  # px/frame, each object's speed is drawn around this
    object_scale: float = 1.0  # object size relative to the default (about 1/6 of the frame height)

    def __post_init__(self):
        problems = []
        if self.width < 32 or self.height < 32:
            problems.append(f"frame {self.width}x{self.height} is smaller than 32x32")
        if self.width % 2 or self.height % 2:
            problems.append(f"frame {self.width}x{self.height} has an odd side; H.264/HEVC yuv420p "
                            "needs even sides (pad or crop to even)")
        if self.frames < 1 or self.fps < 1 or self.gop < 1:
            problems.append("frames, fps and gop must be >= 1")
        if self.num_objects < 0:
            problems.append("num_objects must be >= 0")
        if self.camera not in CAMERAS:
            problems.append(f"camera must be one of {CAMERAS}, got {self.camera!r}")
        if not (self.pan_speed >= 0 and self.object_speed >= 0 and self.object_scale > 0
                and -0.05 < self.zoom_speed < 0.05):
            problems.append("speeds must be >= 0, object_scale > 0, |zoom_speed| < 0.05")
        if problems:
            raise ValueError("invalid SceneSpec: " + "; ".join(problems))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SceneSpec":
        return cls(**json.loads(text))


@dataclass
class SceneFrame:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (N, 4) float32 xyxy pixels of the visible part
    classes: np.ndarray  # (N,) int64
    instance_masks: np.ndarray  # (N, H, W) bool, visible part
    object_ids: np.ndarray  # (N,) int64, stable over the clip
    flow: np.ndarray  # (H, W, 2) float32: pixel x of frame t came from x + flow in t-1
    labels: np.ndarray = field(repr=False, default=None)  # (H, W) int16 object id, -1 background


def _upsample_bilinear(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Separable bilinear resize of a (h, w, C) grid to (height, width, C)."""
    gh, gw = grid.shape[:2]
    ys = np.linspace(0, gh - 1, height)
    xs = np.linspace(0, gw - 1, width)
    y0 = np.minimum(ys.astype(np.int64), gh - 2) if gh > 1 else np.zeros(height, np.int64)
    x0 = np.minimum(xs.astype(np.int64), gw - 2) if gw > 1 else np.zeros(width, np.int64)
    fy = (ys - y0)[:, None, None].astype(np.float32)
    fx = (xs - x0)[None, :, None].astype(np.float32)
    y1 = np.minimum(y0 + 1, gh - 1)
    x1 = np.minimum(x0 + 1, gw - 1)
    rows = grid[y0] * (1 - fy) + grid[y1] * fy
    return rows[:, x0] * (1 - fx) + rows[:, x1] * fx


def _value_noise(rng: np.random.Generator, height: int, width: int,
                 cell_sizes=(64, 16, 5, 2), weights=(0.35, 0.25, 0.2, 0.2)) -> np.ndarray:
    """Multi-octave colour value noise in [0, 1], (height, width, 3) float32. The finest octave
    gives the texture that lets the encoder (and block matching) find the true motion."""
    out = np.zeros((height, width, 3), np.float32)
    for cell, weight in zip(cell_sizes, weights):
        grid = rng.random((height // cell + 2, width // cell + 2, 3), dtype=np.float32)
        out += weight * _upsample_bilinear(grid, height, width)
    return out


def _triangle_wave(x: np.ndarray | float, length: float):
    """Position bouncing in [0, length]."""
    if length <= 0:
        return np.zeros_like(x)
    period = 2 * length
    return length - np.abs(np.mod(x, period) - length)


class _Sprite:
    """One textured object: its RGB texture and shape mask, and its screen-space trajectory."""

    def __init__(self, rng: np.random.Generator, object_id: int, cls: int, spec: SceneSpec):
        self.object_id, self.cls = object_id, cls
        base = spec.object_scale * min(spec.height, spec.width) / 6
        size = base * rng.uniform(0.75, 1.3)
        aspect = {0: 2.0, 1: 0.45, 2: 1.0, 3: 1.1}[cls]  # width / height
        h = max(8, int(round(size / math.sqrt(aspect))))
        w = max(8, int(round(size * math.sqrt(aspect))))
        h, w = min(h, spec.height - 2), min(w, spec.width - 2)
        self.h, self.w = h, w
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        v = (yy + 0.5) / h * 2 - 1  # [-1, 1]
        u = (xx + 0.5) / w * 2 - 1
        colour = rng.uniform(0.15, 0.95, 3).astype(np.float32)
        second = 1 - colour
        if cls == 0:  # car: rounded rectangle, horizontal stripes, two dark wheels
            # Products, not np.power: numpy's AVX-512 power (SVML) rounds differently from
            # libm's, which would move the shape's edge pixels between CPUs.
            u2, v2 = u * u, v * v
            mask = (u2 * u2 * u2 + v2 * v2 * v2) <= 1
            pattern = (np.floor(yy / 4) % 2)[..., None]
            wheels = ((u + 0.55) ** 2 * 4 + (v - 0.7) ** 2 * 12 < 0.35) | \
                     ((u - 0.55) ** 2 * 4 + (v - 0.7) ** 2 * 12 < 0.35)
            tex = colour * (1 - pattern) + second * pattern
            tex[wheels] = 0.05
        elif cls == 1:  # person: head disc over a tall body ellipse, checkerboard
            head = u ** 2 + ((v + 0.75) / 0.22) ** 2 * 0.2 <= 0.2
            body = (u / 0.95) ** 2 + ((v + 0.05) / 0.78) ** 2 <= 1
            mask = head | body
            pattern = ((np.floor(yy / 3) + np.floor(xx / 3)) % 2)[..., None]
            tex = colour * (1 - pattern) + second * pattern
        elif cls == 2:  # ball: disc with concentric rings
            r = np.sqrt(u ** 2 + v ** 2)
            mask = r <= 1
            pattern = (np.floor(r * 7) % 2)[..., None]
            tex = colour * (1 - pattern) + second * 0.8 * pattern
        else:  # sign: upward triangle with polka dots
            mask = (v >= -1) & (np.abs(u) <= (v + 1) / 2)
            dots = ((np.mod(xx, 6) - 3) ** 2 + (np.mod(yy, 6) - 3) ** 2 < 4)[..., None]
            tex = np.where(dots, second, colour)
        tex = np.clip(tex + rng.normal(0, 0.04, tex.shape).astype(np.float32), 0, 1)
        self.texture = (tex * 255).astype(np.uint8)
        self.mask = mask
        self.x0, self.y0 = rng.uniform(0, spec.width - w), rng.uniform(0, spec.height - h)
        angle = rng.uniform(0, 2 * math.pi)
        speed = spec.object_speed * rng.uniform(0.5, 1.5)
        self.vx, self.vy = speed * math.cos(angle), speed * math.sin(angle)
        self.range_x, self.range_y = spec.width - w, spec.height - h

    def position(self, t: float) -> tuple[int, int]:
        """Integer top-left at frame t (integer positions keep the true motion exact)."""
        x = _triangle_wave(self.x0 + self.vx * t, self.range_x)
        y = _triangle_wave(self.y0 + self.vy * t, self.range_y)
        return int(np.rint(x)), int(np.rint(y))


class Scene:
    """A deterministic scene; ``render(t)`` is pure (any order, any t >= 0)."""

    def __init__(self, spec: SceneSpec):
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        self.centre = np.array([spec.width / 2, spec.height / 2])
        angle = math.radians(spec.pan_angle if spec.pan_angle is not None
                             else rng.uniform(0, 360))
        pan = spec.pan_speed if "pan" in spec.camera else 0.0
        # Quarter-pel velocity: what the codec can represent exactly.
        self.pan_velocity = np.round(np.array([math.cos(angle), math.sin(angle)]) * pan * 4) / 4
        self.zoom_speed = spec.zoom_speed if "zoom" in spec.camera else 0.0
        # World big enough for the whole pan (both directions) plus zoom-out headroom.
        travel = np.abs(self.pan_velocity) * (spec.frames + 2)
        zoom_out = max(1.0, 1.0 / self.zoom_scale(spec.frames + 2))
        self.world_w = int(math.ceil(spec.width * zoom_out + 2 * travel[0])) + 16
        self.world_h = int(math.ceil(spec.height * zoom_out + 2 * travel[1])) + 16
        self.world = (_value_noise(rng, self.world_h, self.world_w) * 255).astype(np.float32)
        self.world_centre = np.array([self.world_w / 2, self.world_h / 2])
        classes = rng.integers(0, len(CLASS_NAMES), spec.num_objects)
        self.sprites = [_Sprite(rng, i, int(c), spec) for i, c in enumerate(classes)]

    def zoom_scale(self, t: float) -> float:
        if float(t).is_integer() and t >= 0:
            # Repeated products are exact IEEE steps; libm's pow has CPU-specific (FMA) variants.
            scale = 1.0
            for _ in range(int(t)):
                scale *= 1.0 + self.zoom_speed
            return scale
        return (1.0 + self.zoom_speed) ** t

    def _camera(self, t: float) -> tuple[np.ndarray, float]:
        return self.world_centre + self.pan_velocity * t, self.zoom_scale(t)

    def _background(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Background image (H, W, 3) float and its true backward flow (H, W, 2)."""
        spec = self.spec
        cam, zoom = self._camera(t)
        xs = np.arange(spec.width, dtype=np.float64) + 0.5 - self.centre[0]  # pixel centres
        ys = np.arange(spec.height, dtype=np.float64) + 0.5 - self.centre[1]
        wx = cam[0] + xs / zoom - 0.5  # world sample coordinates (pixel-centre convention)
        wy = cam[1] + ys / zoom - 0.5
        x0 = np.clip(np.floor(wx).astype(np.int64), 0, self.world_w - 2)
        y0 = np.clip(np.floor(wy).astype(np.int64), 0, self.world_h - 2)
        fx = np.clip(wx - x0, 0, 1).astype(np.float32)[None, :, None]
        fy = np.clip(wy - y0, 0, 1).astype(np.float32)[:, None, None]
        rows = self.world[y0] * (1 - fy) + self.world[y0 + 1] * fy
        image = rows[:, x0] * (1 - fx) + rows[:, x0 + 1] * fx
        return image, self.background_displacement(t, t - 1)

    def background_displacement(self, t: float, t_ref: float) -> np.ndarray:
        """True backward displacement (H, W, 2) of the background from frame ``t`` to ``t_ref``:
        pixel x of frame t shows what frame t_ref showed at x + d (objects not included)."""
        spec = self.spec
        cam, zoom = self._camera(t)
        cam_ref, zoom_ref = self._camera(t_ref)
        xs = np.arange(spec.width, dtype=np.float64) + 0.5 - self.centre[0]
        ys = np.arange(spec.height, dtype=np.float64) + 0.5 - self.centre[1]
        out = np.empty((spec.height, spec.width, 2), np.float32)
        out[..., 0] = ((cam[0] + xs / zoom - cam_ref[0]) * zoom_ref - xs)[None, :]
        out[..., 1] = ((cam[1] + ys / zoom - cam_ref[1]) * zoom_ref - ys)[:, None]
        return out

    def object_displacement(self, object_id: int, t: int, t_ref: int) -> tuple[int, int]:
        """True (dx, dy) of an object from frame t back to frame t_ref."""
        sprite = self.sprites[object_id]
        (x, y), (rx, ry) = sprite.position(t), sprite.position(t_ref)
        return rx - x, ry - y

    def render(self, t: int) -> SceneFrame:
        if t < 0:
            raise ValueError(f"frame index must be >= 0, got {t}")
        spec = self.spec
        image, flow = self._background(t)
        labels = np.full((spec.height, spec.width), -1, np.int16)
        for sprite in self.sprites:  # list order is depth order: later sprites occlude earlier
            x, y = sprite.position(t)
            region = (slice(y, y + sprite.h), slice(x, x + sprite.w))
            m = sprite.mask
            image[region][m] = sprite.texture[m]
            flow[region][m] = self.object_displacement(sprite.object_id, t, t - 1)
            labels[region][m] = sprite.object_id
        ids, boxes, classes, masks = [], [], [], []
        for sprite in self.sprites:
            visible = labels == sprite.object_id
            if visible.sum() < MIN_VISIBLE_PIXELS:
                continue
            rows = np.flatnonzero(visible.any(axis=1))
            cols = np.flatnonzero(visible.any(axis=0))
            boxes.append((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1))
            ids.append(sprite.object_id)
            classes.append(sprite.cls)
            masks.append(visible)
        h, w = spec.height, spec.width
        return SceneFrame(
            image=np.ascontiguousarray(np.clip(image + 0.5, 0, 255).astype(np.uint8)),
            boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
            classes=np.asarray(classes, np.int64),
            instance_masks=np.asarray(masks, bool).reshape(-1, h, w),
            object_ids=np.asarray(ids, np.int64),
            flow=flow,
            labels=labels,
        )


def block_motion(flow: np.ndarray, block: int = MV_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel flow (H, W, 2) -> block mean (ceil(H/b), ceil(W/b), 2) and whether the block's
    flow is uniform (a single motion inside it)."""
    h, w = flow.shape[:2]
    ph, pw = -h % block, -w % block
    padded = np.pad(flow, ((0, ph), (0, pw), (0, 0)), mode="edge")
    blocks = padded.reshape((h + ph) // block, block, (w + pw) // block, block, 2)
    mean = blocks.mean(axis=(1, 3)).astype(np.float32)
    spread = (blocks.max(axis=(1, 3)) - blocks.min(axis=(1, 3))).max(axis=-1)
    return mean, spread < 1e-3


@dataclass
class ClipPaths:
    video: Path
    ground_truth: Path


@dataclass
class GroundTruth:
    spec: SceneSpec
    codec: str
    boxes: list  # per frame (N, 4) float32 xyxy
    classes: list  # per frame (N,) int64
    object_ids: list  # per frame (N,) int64
    block_flow: np.ndarray  # (T, ceil(H/4), ceil(W/4), 2) float32 true backward block motion
    block_uniform: np.ndarray  # (T, Hb, Wb) bool: one motion inside the block
    background_blocks: np.ndarray  # (T, Hb, Wb) bool: background now and at its source in t-1

    def __len__(self) -> int:
        return len(self.boxes)


def _background_blocks(labels: np.ndarray, prev_labels: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Blocks that are background and whose true source in t-1 is in-frame background."""
    h, w = labels.shape
    ys, xs = np.mgrid[0:h, 0:w]
    sx = np.rint(xs + flow[..., 0]).astype(np.int64)
    sy = np.rint(ys + flow[..., 1]).astype(np.int64)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    src_label = prev_labels[np.clip(sy, 0, h - 1), np.clip(sx, 0, w - 1)]
    good = (labels < 0) & inside & (src_label < 0)
    ph, pw = -h % MV_BLOCK, -w % MV_BLOCK
    good = np.pad(good, ((0, ph), (0, pw)), constant_values=False)
    return good.reshape(good.shape[0] // MV_BLOCK, MV_BLOCK, good.shape[1] // MV_BLOCK,
                        MV_BLOCK).all(axis=(1, 3))


def x264_options(*, gop: int, ref: int = 1, bframes: int = 0, crf: int = 18,
                 preset: str = "fast", tune: str | None = None) -> dict[str, str]:
    """libx264 stream options that give the same bitstream on every CPU and run (a key frame
    every ``gop`` frames, no scene-cut key frames). Encode on one codec thread as well."""
    # One thread, and no MB-tree with B-frames: either makes this x264 build's bitstream
    # vary from run to run (measured), and clips must be reproducible.
    extra = ":mbtree=0" if bframes else ""
    # asm=0: x264's SSSE3+ kernels take other mode decisions than its C code (measured), so
    # the bitstream would depend on the CPU; the C code gives one clip everywhere.
    options = {"crf": str(crf), "preset": preset,
               "x264-params": f"ref={ref}:bframes={bframes}:keyint={gop}:"
                              f"min-keyint={gop}:scenecut=0:threads=1:asm=0{extra}"}
    if tune is not None:
        options["tune"] = tune
    return options


def exact_yuv420p_frame(image: np.ndarray):
    """(H, W, 3) uint8 RGB -> an ``av.VideoFrame`` in yuv420p, converted with bit-exact swscale:
    the encoder's own conversion would use the CPU's SIMD kernels, which round differently."""
    import av
    from av.video.reformatter import Interpolation

    exact = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.BITEXACT
    return av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
        format="yuv420p", interpolation=exact)


def _encoder_options(codec: str, spec: SceneSpec, ref: int, bframes: int, crf: int,
                     preset: str) -> dict[str, str]:
    if codec == "libx264":
        return x264_options(gop=spec.gop, ref=ref, bframes=bframes, crf=crf, preset=preset)
    return {"crf": str(crf), "preset": preset,  # asm=0 for the same reason as x264
            "x265-params": f"ref={ref}:bframes={bframes}:keyint={spec.gop}:min-keyint={spec.gop}:"
                           "scenecut=0:frame-threads=1:pools=1:asm=0:log-level=error"}


def make_clip(spec: SceneSpec, out_dir: str | Path, codec: str = "libx264", ref: int = 1, *,
              bframes: int = 0, crf: int = 18, preset: str = "fast", name: str | None = None,
              progress: bool = False) -> ClipPaths:
    """Render ``spec``, encode it to ``out_dir/<name>.mp4`` and save the ground truth beside it
    (``<name>.npz``). ``ref`` > 1 makes x264 use older reference frames (the motion layer must
    then validate vectors)."""
    import av
    from tqdm import tqdm

    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    if not 1 <= ref <= 16 or not 0 <= bframes <= 16:
        raise ValueError("ref must be in [1, 16] and bframes in [0, 16]")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or f"synth-{spec.camera.replace('+', '-')}-{spec.width}x{spec.height}-s{spec.seed}-{codec}-ref{ref}"
    video_path, truth_path = out_dir / f"{name}.mp4", out_dir / f"{name}.npz"
    scene = Scene(spec)
    counts, boxes, classes, ids, flows, uniform, background = [], [], [], [], [], [], []
    prev_labels = None
    with av.open(str(video_path), "w") as container:
        stream = container.add_stream(codec, rate=spec.fps)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        stream.options = _encoder_options(codec, spec, ref, bframes, crf, preset)
        stream.codec_context.thread_count = 1  # reproducible bitstreams
        for t in tqdm(range(spec.frames), desc=f"synth {name}", unit="frame", disable=not progress,
                      dynamic_ncols=True):
            frame = scene.render(t)
            video_frame = exact_yuv420p_frame(frame.image)
            video_frame.pts = t
            for packet in stream.encode(video_frame):
                container.mux(packet)
            counts.append(len(frame.classes))
            boxes.append(frame.boxes)
            classes.append(frame.classes)
            ids.append(frame.object_ids)
            mean, uni = block_motion(frame.flow)
            flows.append(mean)
            uniform.append(uni)
            if prev_labels is None:
                background.append(np.zeros_like(uni))
            else:
                background.append(_background_blocks(frame.labels, prev_labels, frame.flow))
            prev_labels = frame.labels
        for packet in stream.encode(None):
            container.mux(packet)
    np.savez_compressed(
        truth_path, spec_json=np.array(spec.to_json()), codec=np.array(codec),
        counts=np.asarray(counts, np.int64), boxes=np.concatenate(boxes).reshape(-1, 4),
        classes=np.concatenate(classes), object_ids=np.concatenate(ids),
        block_flow=np.stack(flows), block_uniform=np.stack(uniform),
        background_blocks=np.stack(background))
    return ClipPaths(video=video_path, ground_truth=truth_path)


def load_ground_truth(path: str | Path) -> GroundTruth:
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        spec = SceneSpec.from_json(str(data["spec_json"]))
        counts = data["counts"]
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path} is not a FluxShard ground-truth file: {exc}") from exc
    splits = np.cumsum(counts)[:-1]
    return GroundTruth(
        spec=spec, codec=str(data["codec"]),
        boxes=np.split(data["boxes"], splits), classes=np.split(data["classes"], splits),
        object_ids=np.split(data["object_ids"], splits), block_flow=data["block_flow"],
        block_uniform=data["block_uniform"], background_blocks=data["background_blocks"])
