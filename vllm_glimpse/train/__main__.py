"""``python -m vllm_glimpse.train vlm --family qwen2_5_vl --out DIR [--steps N] ...``"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from vllm_glimpse.train.vlm import SIDES, TrainConfig, train_vlm

    p = argparse.ArgumentParser(prog="python -m vllm_glimpse.train",
                                description="Train a small VLM on easy-vqa mosaics (CPU).")
    sub = p.add_subparsers(dest="command", required=True)
    vlm = sub.add_parser("vlm", help="train a small Qwen2.5-VL or LLaVA-1.5 layout model")
    vlm.add_argument("--family", choices=sorted(SIDES), default="qwen2_5_vl")
    vlm.add_argument("--out", required=True, help="checkpoint directory (replaced)")
    defaults = TrainConfig()
    for name in ("steps", "batch_size", "warmup_steps", "seed", "grid", "threads"):
        vlm.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    vlm.add_argument("--lr", type=float, default=defaults.lr)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = TrainConfig(family=args.family, steps=args.steps, batch_size=args.batch_size,
                          warmup_steps=args.warmup_steps, seed=args.seed, grid=args.grid,
                          threads=args.threads, lr=args.lr)
    except ValueError as e:
        p.error(str(e))
    report = train_vlm(cfg, args.out)
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
