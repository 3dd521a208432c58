"""Evaluation metrics for semantic and video semantic segmentation (spec §4.2-4.3)."""

from .metrics import ConfusionMatrix, VideoConsistency, video_consistency

__all__ = ["ConfusionMatrix", "VideoConsistency", "video_consistency"]
