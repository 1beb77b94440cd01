"""Issue-5 acceptance in one command: the truncation profile with its speedups.

For each motion level (still camera, pan, pan+zoom; held-out synthetic clips, H.264-decoded) it
sweeps tau, picks the largest tau keeping mAP@0.5:0.95 (--metric) >= alpha x dense (alpha 0.99),
and prints at that tau: accuracy against dense, cache hit rate and the whole-model speedup of the
sparse executor against the best dense runner (onnxruntime or fused channels_last torch) timed in
the same run on the same thread count. Writes the truncation table (JSON) and its plot (accuracy, cache hit,
speedup against tau). Same as `fluxshard profile accuracy`.

    python3 perf/bench_truncation.py              # 640x384, 30 frames per level, 8 taus up to 0.6
    python3 perf/bench_truncation.py --quick      # 320x192, 12 frames, 4 taus (a few minutes)
"""

from __future__ import annotations

import argparse
import sys

from fluxshard.tools.profile import add_accuracy_arguments, run_accuracy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_accuracy_arguments(p)
    return run_accuracy(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
