#!/usr/bin/env python3
"""Assemble the shipped default model from the two training stages.

    python3 scripts/ship_model.py --segmentor runs/stage1f/model_final.pt \
        --motion runs/stage2e/model_final.pt --out models/mpvss_lite_camvid.pt

The segmentor (backbone, pixel decoder, transformer decoder with its class/mask heads) comes from
stage 1, the motion module from stage 2 (whose other weights must equal stage 1's: a stage-2 run
with ``--head-lr-mult 0``), and the configuration from stage 2's checkpoint (it
carries the motion settings stage 2 trained with), or from ``--model`` (a name or YAML file) for a
setting that changes no weight shape, such as ``motion.image_scale`` at inference; the weights must
then load into the model it describes, key for key. Several ``--motion`` checkpoints (runs of one
recipe from the same start) ship the uniform average of their motion modules, a "model soup"
(Wortsman et al., ICML 2022); the configuration then comes from the last one. Floating-point
tensors are stored as float16.
The provenance in ``meta["training"]`` is read from the runs' ``options.json`` files, following
``init_checkpoint`` back to the first run (see models/README.md for the commands).
"""

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from mpvss_ros.checkpoints import CheckpointError, read_checkpoint, read_state_dict, save_checkpoint
from mpvss_ros.config import ConfigError, load_model_config, model_config_from_dict
from mpvss_ros.nn.mpvss import MPVSS
from mpvss_ros.runtime.bench import hardware_info

#: Options worth recording from a run's options.json.
_KEEP = ("run_dir", "model", "steps", "batch_size", "crop", "scale", "lr", "head_lr_mult", "matcher", "flow_weight",
         "video_fraction", "synthetic_fraction", "synthetic_travel", "max_gap", "chain_training",
         "init_checkpoint", "init_motion", "seed", "threads")


def run_chain(checkpoint: str, follow: str = "init_checkpoint", part: str = "segmentor") -> list[dict[str, Any]]:
    """Options of the run that wrote ``checkpoint`` and of the runs it was initialised from, oldest first.

    ``follow`` names the option that points to the previous run's checkpoint; ``init_motion``
    (where a run has it) traces the motion module's lineage instead of the segmentor's. A
    checkpoint without a run folder (e.g. the shipped file, used as a starting point) contributes
    the lineage of ``part`` recorded in its own ``meta["training"]``.
    """
    chain: list[dict[str, Any]] = []
    path: str | None = checkpoint
    while path:
        options = Path(path).parent / "options.json"
        if not options.is_file() and Path(path).is_file():
            stored = read_checkpoint(path).meta.get("training", {}).get(part, [])
            chain.extend(reversed(stored) if isinstance(stored, list) else [stored])  # a dict: {"average_of": ...}
            break
        if not options.is_file() or len(chain) > 10:
            break
        try:
            opts = json.loads(options.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{options} is not a run's options (not JSON: {exc})") from None
        if not isinstance(opts, dict):
            raise ValueError(f"{options} is not a run's options (a JSON object), it holds a {type(opts).__name__}")
        chain.append({k: opts[k] for k in _KEEP if k in opts})
        path = opts.get(follow) or opts.get("init_checkpoint")
        if path is not None and not isinstance(path, str):
            raise ValueError(f"{options}: {follow} / init_checkpoint must be a checkpoint's path, got {path!r}")
    return chain[::-1]


def average(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The uniform average of same-shaped tensors, in float32 for floating point; integer tensors
    (e.g. BatchNorm's ``num_batches_tracked``) must be equal and are kept.

    Raises:
        ValueError: shapes that differ, or integer tensors that differ.
    """
    if any(t.shape != tensors[0].shape for t in tensors[1:]):
        raise ValueError(f"the --motion checkpoints hold tensors of shapes {[tuple(t.shape) for t in tensors]}")
    if tensors[0].is_floating_point():
        return sum(t.float() for t in tensors) / len(tensors)
    if any(not torch.equal(tensors[0], t) for t in tensors[1:]):
        raise ValueError("integer tensors differ between the --motion checkpoints")
    return tensors[0]


def segmentor_differences(segmentor: dict[str, torch.Tensor], motion: dict[str, torch.Tensor]) -> list[str]:
    """Keys outside ``motion.*`` whose tensors differ between a stage-2 checkpoint and the stage-1
    state dict it is shipped with, compared at float16, the shipped precision (a stage-2 run that
    started from a shipped float16 file holds the same values as the float32 stage-1 file it came
    from). Stage 2 with ``--head-lr-mult 0`` freezes all of them, BatchNorm statistics included;
    with the default 0.1 it trains the class and mask heads with the motion module."""
    return [k for k, v in segmentor.items() if not k.startswith("motion.") and k in motion
            and (motion[k].shape != v.shape or not torch.equal(motion[k].half(), v.half()))]


def this_machine() -> str:
    """CPU cores and model, torch build and GPU of this machine (which trained the last stage-2 run)."""
    hw = hardware_info(threads=torch.get_num_threads())
    return f"{hw['logical_cpus']} CPU cores ({hw['cpu']}), torch {hw['torch']}, {hw['gpu'] or 'no GPU'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segmentor", required=True, help="stage-1 checkpoint (segmentor and heads)")
    ap.add_argument("--motion", required=True, nargs="+",
                    help="stage-2 checkpoint (motion module and config); several: their motion modules averaged, "
                         "the config from the last")
    ap.add_argument("--out", required=True,
                    help="file to write (models/mpvss_lite_camvid.pt replaces the shipped model)")
    ap.add_argument("--model", default=None, help="model name or YAML replacing the motion checkpoint's config")
    args = ap.parse_args()
    if len(set(args.motion)) != len(args.motion):
        ap.error("--motion lists a checkpoint twice (it would weigh double)")
    try:
        _ship(ap, args)
    except (CheckpointError, ConfigError, ValueError, OSError) as exc:  # a damaged or mismatched input, the output
        ap.exit(1, f"{ap.prog}: error: {exc}\n")
    except RuntimeError as exc:  # load_state_dict: --model's shapes differ from the checkpoints'
        ap.exit(1, f"{ap.prog}: error: the weights do not fit the configuration: {str(exc).strip()}\n")


def _ship(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    seg, mots = read_state_dict(args.segmentor), [read_checkpoint(m) for m in args.motion]
    for path, mot in zip(args.motion, mots):
        differ = segmentor_differences(seg, mot.state_dict)
        if differ:
            ap.error(f"{path}: {len(differ)} of its segmentor tensors differ from --segmentor's ({', '.join(differ[:3])}"
                     f"{', ...' if len(differ) > 3 else ''}), so its motion module learnt to warp other masks: a "
                     "stage-2 run that trained the class/mask heads (--head-lr-mult > 0, its default) or that "
                     "started from another segmentor. Pass the stage-1 file that run started from as --segmentor, "
                     "or that stage-2 checkpoint itself to keep its heads")
    settings = [m.model_config.get("motion") for m in mots]
    if any(x != settings[-1] for x in settings):  # e.g. image_scale, an inference setting; shapes are checked below
        print("note: the --motion checkpoints' motion settings differ; the configuration comes from "
              + (args.model or args.motion[-1]))
    cfg = load_model_config(args.model) if args.model else model_config_from_dict(mots[-1].model_config)
    cfg.default_weights = "models/mpvss_lite_camvid.pt"
    model = MPVSS(cfg)
    missing = [k for k in model.state_dict()
               if (k.startswith("motion.") and any(k not in m.state_dict for m in mots))
               or (not k.startswith("motion.") and k not in seg)]
    if missing:  # another model's configuration (--model): a KeyError before
        raise ValueError(f"the checkpoints lack {len(missing)} of the {cfg.name} model's tensors "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): --model describes another model")
    model.load_state_dict({k: (average([m.state_dict[k] for m in mots]) if k.startswith("motion.") else seg[k])
                           for k in model.state_dict()})
    motion_chains = [run_chain(m, follow="init_motion", part="motion") for m in args.motion]
    meta = {
        "model": cfg.name, "classes": cfg.class_names,
        "segmentor_from": args.segmentor,
        "motion_from": args.motion[0] if len(args.motion) == 1 else {"average_of": args.motion},
        "config_from": args.model or args.motion[-1],
        "training": {"segmentor": run_chain(args.segmentor),
                     "motion": motion_chains[0] if len(args.motion) == 1 else {"average_of": motion_chains}},
        "data": "CamVid train (367 frames, SegNet split); stage 2 also pseudo-labelled solidWhiteRight.mp4 / bikes.mp4 pairs",
        "hardware": this_machine(),
    }
    save_checkpoint(args.out, model, cfg.to_dict(), meta=meta, half=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
