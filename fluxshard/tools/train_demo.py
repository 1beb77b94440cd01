"""`fluxshard train-demo`: train the embedded demo weights (yolo11n detect and/or seg) on CPU.

Rerunning the same command resumes from ``<workdir>/<task>/last.pt`` (saved every epoch) and
finishes the run; ``--fresh`` starts over. The result is deterministic for ``--seed`` on a given
machine and thread count.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from fluxshard import cli_common
from fluxshard.tools import args as shared

DEFAULT_WORKDIR = Path("runs/train-demo")
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"  # fluxshard/weights
DEFAULT_OUT = {"detect": WEIGHTS_DIR / "yolo11n-detect-demo.pt",
               "segment": WEIGHTS_DIR / "yolo11n-seg-demo.pt"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-demo", help="train the embedded demo weights",
                       description=cli_common.describe(__doc__))
    pos_int, pos_float = cli_common.positive_int, cli_common.positive_float
    p.add_argument("--task", choices=["detect", "segment", "both"], default="both",
                   help="which demo weights to train")
    p.add_argument("--workdir", type=cli_common.output_folder, default=DEFAULT_WORKDIR,
                   help="checkpoints, history and the rendered-data cache (default %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="weights file (single task only; default: the package's embedded default)")
    # None: TrainConfig's default (or --quick's); the help states both
    p.add_argument("--epochs", type=pos_int, default=None,
                   help="training epochs (default: 5; --quick: 2)")
    p.add_argument("--batch", type=pos_int, default=None,
                   help="images per step (default: 16; --quick: 8)")
    p.add_argument("--crop", type=cli_common.multiple_of(32), nargs=2, default=None,
                   metavar=("H", "W"),
                   help="training crop, multiples of 32 (default: 320 320; --quick: 256 256)")
    p.add_argument("--train-scenes", type=pos_int, default=None,
                   help="synthetic training scenes (default: 600; --quick: 12)")
    p.add_argument("--frames-per-scene", type=pos_int, default=None,
                   help="frames sampled per training scene (default: 4; --quick: 2)")
    p.add_argument("--val-scenes", type=pos_int, default=None,
                   help="held-out validation scenes (default: 16; --quick: 2)")
    p.add_argument("--lr", type=pos_float, default=None, help="peak learning rate (default: 0.002)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default=None,
                   help="optimizer (default: adamw)")
    p.add_argument("--seed", type=int, default=0, help="random seed (data and initialisation)")
    shared.add_threads(p, default=2)
    p.add_argument("--fresh", action="store_true", help="discard an existing checkpoint")
    p.add_argument("--quick", action="store_true",
                   help="a few-minute smoke run (tiny data, 2 epochs); writes into the workdir")
    shared.add_no_progress(p, help="no tqdm bars (for log files)")
    p.set_defaults(func=main)


def config_for(task: str, args: argparse.Namespace):
    from fluxshard.train.trainer import TrainConfig

    overrides = {"epochs": args.epochs, "batch": args.batch, "crop": args.crop,
                 "train_scenes": args.train_scenes, "frames_per_scene": args.frames_per_scene,
                 "val_scenes": args.val_scenes, "lr": args.lr, "optimizer": args.optimizer}
    base = {"task": task, "seed": args.seed, "threads": args.threads,
            "progress": not args.no_progress}
    if args.quick:
        base.update(epochs=2, batch=8, crop=(256, 256), train_scenes=12, frames_per_scene=2,
                    val_scenes=2, val_frames_per_scene=2, warmup_iters=2)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**base)


def main(args: argparse.Namespace) -> int:
    import torch

    from fluxshard.train.trainer import Trainer

    torch.set_num_threads(args.threads)  # once, here at the entry point

    tasks = ["detect", "segment"] if args.task == "both" else [args.task]
    if args.out is not None and len(tasks) > 1:
        raise cli_common.UsageError("--out needs a single --task")
    command = "fluxshard " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    for task in tasks:
        cfg = config_for(task, args)
        workdir = args.workdir / task
        if args.fresh:  # the rendered-data cache stays: it depends only on the data setup
            (workdir / "last.pt").unlink(missing_ok=True)
            (workdir / "history.jsonl").unlink(missing_ok=True)
        trainer = Trainer(cfg, workdir, cache_dir=args.workdir / "cache")
        if trainer.resume():
            print(f"resumed {task} from {trainer.checkpoint_path} after epoch {trainer.epoch}")
        trainer.train()
        out = args.out or (workdir / "weights.pt" if args.quick else DEFAULT_OUT[task])
        path = trainer.export(out, command=command)
        last = trainer.history[-1] if trainer.history else {}
        print(f"{task}: wrote {path} (held-out mAP@0.5 {last.get('map50')}, "
              f"mAP@0.5:0.95 {last.get('map50_95')})")
    return 0
