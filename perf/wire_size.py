"""Uplink bytes per frame of the wire format, and the choices behind it, on a synthetic clip.

Key frames: the shipped encoding (2-D differenced pixels, zlib 6) vs plain zlib (levels 1/6/9),
PNG and WebP-lossless (Pillow). Residual frames: the shipped encoding (quarter-pel field + bitmap +
2-D differenced tiles, zlib 6) against the same tiles without differencing, and the field's share. Encode/decode times are medians of this
run. Every frame goes to the cloud (the cloud cache is the rebuilt input).

    python perf/wire_size.py --width 640 --height 384 --frames 30 --tau 0.047
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from fluxshard.tau import tau_argument


def timed(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, (time.perf_counter() - t0) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--tau", type=tau_argument, default=12 / 255,
                    help="tau on the [0, 1] input scale (fluxshard.tau; default: 12/255)")
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--camera", default="pan")
    args = ap.parse_args(argv)

    from PIL import Image

    from fluxshard import wire
    from fluxshard.endpoint import EndpointPath, Uplink
    from fluxshard.motion.decode import iter_motion
    from fluxshard.synth import SceneSpec, make_clip

    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(SceneSpec(width=args.width, height=args.height, frames=args.frames,
                                   gop=args.frames, seed=1, camera=args.camera), Path(tmp),
                         name="wire")
        frames = list(iter_motion(clip.video, validate=False))

    raw_frame = args.width * args.height * 3
    key = frames[0].image
    print(f"{args.width}x{args.height}, {len(frames)} frames, camera {args.camera}, tau {args.tau}, "
          f"raw frame {raw_frame / 1e3:.1f} kB\n")
    print(f"{'key frame codec':<22} {'kB':>8} {'x raw':>7} {'enc ms':>8} {'dec ms':>8}")
    rows = []
    payload, te = timed(wire.encode_key_frame, key, 0)
    _, td = timed(wire.decode_request, payload)
    rows.append(("shipped (2-D diff+zlib)", len(payload), te, td))
    for level in (1, 6, 9):
        body, te = timed(zlib.compress, key.tobytes(), level)
        _, td = timed(zlib.decompress, body)
        rows.append((f"plain zlib {level}", len(body) + wire.HEADER_SIZE, te, td))
    buf = io.BytesIO()
    _, te = timed(Image.fromarray(key).save, buf, format="PNG")
    png = buf.getvalue()
    _, td = timed(lambda: np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    rows.append(("PNG (Pillow default)", len(png) + wire.HEADER_SIZE, te, td))
    buf = io.BytesIO()
    _, te = timed(Image.fromarray(key).save, buf, format="WEBP", lossless=True, quality=50)
    webp = buf.getvalue()
    decoded, td = timed(lambda: np.asarray(Image.open(io.BytesIO(webp)).convert("RGB")))
    assert (decoded == key).all(), "WebP lossless is not lossless here"
    rows.append(("WebP lossless", len(webp) + wire.HEADER_SIZE, te, td))
    for name, n, te, td in rows:
        print(f"{name:<22} {n / 1e3:>8.1f} {n / raw_frame:>7.3f} {te:>8.1f} {td:>8.1f}")

    # the cloud's path as the SDK sends it (every frame goes to the cloud)
    path = EndpointPath(args.tau, args.block, uplink=Uplink(args.block))
    path.step_decoded(frames[0])
    shipped, no_diff, field_only, fractions, enc_ms, dec_ms = [], [], [], [], [], []
    for mf in frames[1:]:
        step = path.step_decoded(mf)
        field_q, mask, payload = step.field, step.residual.mask, step.sent.payload
        # the codec alone, timed apart from the rest of the step
        _, te = timed(wire.encode_residual_frame, mf.image, field_q, mask, mf.index, args.block,
                      tau=step.tau)
        _, td = timed(wire.decode_request, payload)
        q = np.rint(field_q * 4).astype(np.int16)
        tiles = wire.residual_tiles(mf.image, mask, args.block)
        plain = q.tobytes() + np.packbits(mask).tobytes() + tiles.tobytes()
        shipped.append(len(payload))
        no_diff.append(len(zlib.compress(plain, wire.ZLIB_LEVEL)) + wire.HEADER_SIZE)
        field_only.append(len(zlib.compress(q.tobytes(), wire.ZLIB_LEVEL)))
        fractions.append(mask.mean())
        enc_ms.append(te)
        dec_ms.append(td)
    med = statistics.median
    print(f"\nresidual frames (median over {len(shipped)}): residual blocks "
          f"{med(fractions) * 100:.1f}% of the frame")
    print(f"  shipped                {med(shipped) / 1e3:8.2f} kB  ({med(shipped) / raw_frame:.3f} "
          f"of raw), encode {med(enc_ms):.1f} ms, decode {med(dec_ms):.1f} ms")
    print(f"  tiles not differenced {med(no_diff) / 1e3:8.2f} kB  "
          f"(differencing saves {1 - med(shipped) / med(no_diff):.1%})")
    print(f"  field alone (zlib)    {med(field_only) / 1e3:8.2f} kB  "
          f"(raw int16 field {q.nbytes / 1e3:.1f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
