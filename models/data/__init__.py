"""Datasets for micro-action recognition: MA-52 in its official format (or a copy made by
models/prepare_ma52.py), and the synthetic micro-action dataset the project trains on by
default. Both yield the same items (`{"clip": (T, H, W, 3) frames, "label", "body",
"subject", "index"}`), batch with `collate_clips` and are normalized on the device by
`normalize_frames`."""

from models.data.clips import SeededSampler, collate_clips, normalize_frames, sample_frame_indices
from models.data.labels import (
    ACTION_NAMES,
    ACTION_TO_BODY,
    BODY_NAMES,
    NUM_ACTIONS,
    NUM_BODIES,
    actions_of_body,
    body_of_action,
)
from models.data.ma52 import MA52Dataset, write_h264_mp4
from models.data.synthetic import SyntheticMicroActions, export_ma52

__all__ = [
    "ACTION_NAMES",
    "ACTION_TO_BODY",
    "BODY_NAMES",
    "NUM_ACTIONS",
    "NUM_BODIES",
    "MA52Dataset",
    "SeededSampler",
    "SyntheticMicroActions",
    "actions_of_body",
    "body_of_action",
    "collate_clips",
    "export_ma52",
    "normalize_frames",
    "sample_frame_indices",
    "write_h264_mp4",
]
