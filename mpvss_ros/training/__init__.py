"""Training of the MPVSS segmentor: matching, losses, CamVid data, the stage-1 trainer.

Spec: ``docs/mpvss_architecture.md`` section 3. Import the trainer from
:mod:`mpvss_ros.training.trainer` (it pulls in the model); the light pieces are re-exported here.
"""

from .criterion import SetCriterion, semantic_batch_to_targets, semantic_to_targets
from .data import CamVidFrames
from .matcher import FixedMatcher, HungarianMatcher, point_sample

__all__ = [
    "SetCriterion",
    "semantic_to_targets",
    "semantic_batch_to_targets",
    "CamVidFrames",
    "HungarianMatcher",
    "FixedMatcher",
    "point_sample",
]
