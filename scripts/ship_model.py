#!/usr/bin/env python3
"""Assemble the shipped default model from the two training stages.

    python3 scripts/ship_model.py --segmentor runs/stage1/model_final.pt \
        --motion runs/stage2/model_final.pt --out models/mpvss_lite_camvid.pt

The segmentor (backbone, pixel decoder, transformer decoder with its class/mask heads) comes from
stage 1, the motion module from stage 2, and the configuration from stage 2's checkpoint (it
carries the motion settings stage 2 trained with). Floating-point tensors are stored as float16.
Why stage 1's heads: on the CamVid val clip stage 2's fine-tuned heads gave 64.12 per-frame and
58.53 query_flow@5 mIoU, stage 1's 65.40 and 59.63 (see models/README.md).
"""

import argparse

from mpvss_ros.checkpoints import read_model_config, read_state_dict, save_checkpoint
from mpvss_ros.config import model_config_from_dict
from mpvss_ros.nn.mpvss import MPVSS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segmentor", required=True, help="stage-1 checkpoint (segmentor and heads)")
    ap.add_argument("--motion", required=True, help="stage-2 checkpoint (motion module and config)")
    ap.add_argument("--out", default="models/mpvss_lite_camvid.pt")
    args = ap.parse_args()
    seg, mot = read_state_dict(args.segmentor), read_state_dict(args.motion)
    cfg = model_config_from_dict(read_model_config(args.motion))
    cfg.default_weights = "models/mpvss_lite_camvid.pt"
    model = MPVSS(cfg)
    model.load_state_dict({k: (mot[k] if k.startswith("motion.") else seg[k]) for k in model.state_dict()})
    meta = {
        "model": cfg.name, "classes": cfg.class_names,
        "segmentor_from": args.segmentor, "motion_from": args.motion,
        "training": "stage 1: CamVid train, 1800 steps x 8 crops 256x320, Hungarian matcher; stage 2: 1000 steps "
                    "x 8 pairs (CamVid train pairs + pseudo-labelled solidWhiteRight/bikes pairs)",
        "hardware": "2 CPU cores (AMD EPYC), torch 2.13.0+cpu, no GPU",
    }
    save_checkpoint(args.out, model, cfg.to_dict(), meta=meta, half=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
