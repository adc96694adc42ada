"""Datasets for micro-action recognition: MA-52 in its official format, and the synthetic
micro-action dataset the project trains on by default. Both yield the same items
(`{"clip": (3, T, H, W) float32, "label", "body", "subject", "index"}`) and batch with
`collate_clips`."""

from models.data.clips import collate_clips, denormalize_clip, normalize_clip, sample_frame_indices
from models.data.labels import (ACTION_NAMES, ACTION_TO_BODY, BODY_NAMES, NUM_ACTIONS, NUM_BODIES,
                                actions_of_body, body_of_action)
from models.data.ma52 import MA52Dataset, write_h264_mp4
from models.data.synthetic import SyntheticMicroActions, export_ma52

__all__ = [
    "ACTION_NAMES", "ACTION_TO_BODY", "BODY_NAMES", "NUM_ACTIONS", "NUM_BODIES",
    "MA52Dataset", "SyntheticMicroActions", "actions_of_body", "body_of_action", "collate_clips",
    "denormalize_clip", "export_ma52", "normalize_clip", "sample_frame_indices", "write_h264_mp4",
]
