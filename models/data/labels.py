"""MA-52's label space: the 52 action names, the 7 body parts and which body each action
belongs to (SPEC §6).

The action names are embedded here (copied from the official `label_name.txt`, one
`<id>\t<name>` row per action) so the package needs no data file; the tests check them
against the official file when it is available. Body ids come from contiguous action-id
ranges; the official evaluation (`lv_evaluate`) derives the body of a prediction the same
way, so the body prediction is always the body of the predicted action.
"""

from __future__ import annotations

import numpy as np
import torch

ACTION_NAMES: tuple[str, ...] = (
    "shaking body",  # 0
    "sitting straightly",  # 1
    "shrugging",  # 2
    "turning around",  # 3
    "rising up",  # 4
    "bowing head",  # 5
    "head up",  # 6
    "tilting head",  # 7
    "turning head",  # 8
    "nodding",  # 9
    "shaking head",  # 10
    "scratching arms",  # 11
    "playing objects",  # 12
    "putting hands together",  # 13
    "rubbing hands",  # 14
    "pointing oneself",  # 15
    "clenching fist",  # 16
    "stretching arms",  # 17
    "retracting arms",  # 18
    "waving",  # 19
    "spreading hands",  # 20
    "hands touching fingers",  # 21
    "other finger movements",  # 22
    "illustrative gestures",  # 23
    "shaking legs",  # 24
    "curling legs",  # 25
    "spread legs",  # 26
    "closing legs",  # 27
    "crossing legs",  # 28
    "stretching feet",  # 29
    "retracting feet",  # 30
    "tiptoe",  # 31
    "scratching or touching neck",  # 32
    "scratching or touching chest",  # 33
    "scratching or touching back",  # 34
    "scratching or touching shoulder",  # 35
    "arms akimbo",  # 36
    "crossing arms",  # 37
    "playing or tidying hair",  # 38
    "scratching or touching hindbrain",  # 39
    "scratching or touching forehead",  # 40
    "scratching or touching face",  # 41
    "rubbing eyes",  # 42
    "touching nose",  # 43
    "touching ears",  # 44
    "covering face",  # 45
    "covering mouth",  # 46
    "pushing glasses",  # 47
    "patting legs",  # 48
    "touching legs",  # 49
    "scratching legs",  # 50
    "scratching feet",  # 51
)

BODY_NAMES: tuple[str, ...] = (
    "body",
    "head",
    "upper limb",
    "lower limb",
    "body-hand",
    "head-hand",
    "leg-hand",
)

# First action id of each body part; body b owns ids BODY_FIRST_ACTION[b] .. next - 1.
BODY_FIRST_ACTION: tuple[int, ...] = (0, 5, 11, 24, 32, 38, 48)

NUM_ACTIONS = len(ACTION_NAMES)
NUM_BODIES = len(BODY_NAMES)

# ACTION_TO_BODY[a] is the body id of action a.
ACTION_TO_BODY: tuple[int, ...] = tuple(
    int(np.searchsorted(BODY_FIRST_ACTION, action, side="right")) - 1 for action in range(NUM_ACTIONS)
)


def actions_of_body(body: int) -> range:
    """The action ids that belong to body part `body`."""
    if not 0 <= body < NUM_BODIES:
        raise ValueError(f"body: expected an id in [0, {NUM_BODIES}), got {body}")
    end = BODY_FIRST_ACTION[body + 1] if body + 1 < NUM_BODIES else NUM_ACTIONS
    return range(BODY_FIRST_ACTION[body], end)


def body_of_action(action_ids):
    """Body id of each action id: an int for an int, else the same container type (tensor
    stays a tensor on its device, numpy array stays an array, sequences become arrays).
    Raises ValueError for ids outside [0, 52)."""
    if isinstance(action_ids, torch.Tensor):
        if action_ids.dtype.is_floating_point or action_ids.dtype == torch.bool:
            raise TypeError(f"action_ids: expected an integer tensor, got dtype {action_ids.dtype}")
        _check_range(
            action_ids.min().item() if action_ids.numel() else 0, action_ids.max().item() if action_ids.numel() else 0
        )
        table = torch.tensor(ACTION_TO_BODY, dtype=action_ids.dtype, device=action_ids.device)
        return table[action_ids]
    if isinstance(action_ids, (int, np.integer)):
        _check_range(int(action_ids), int(action_ids))
        return ACTION_TO_BODY[int(action_ids)]
    ids = np.asarray(action_ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"action_ids: expected integer ids, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.size:
        _check_range(int(ids.min()), int(ids.max()))
    return np.asarray(ACTION_TO_BODY, dtype=np.int64)[ids]


def _check_range(low: int, high: int) -> None:
    if low < 0 or high >= NUM_ACTIONS:
        raise ValueError(f"action_ids: expected ids in [0, {NUM_ACTIONS}), got values in [{low}, {high}]")
