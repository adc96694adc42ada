"""Synthetic micro-actions: the project's default dataset, generated on the fly from a seed
(no download, no files), posing MA-52's problem in miniature.

What it is
- MA-52's 52 classes, names and body grouping (SPEC §6). Each class is a short, small
  motion of the body part(s) its name says, performed by a seated cartoon figure (chair,
  legs, torso, arms with hands and a finger, head with hair, eyes and mouth) rendered in
  RGB with anti-aliased shapes: head nod vs shake vs tilt, shrug, hand to forehead vs
  nose vs ear vs mouth, hand patting vs scratching the leg, leg shake, crossing legs,
  arms akimbo, ... (`ACTION_MOTIONS` lists them all).
- Sized for small frames: the figure spans most of the frame's height and is drawn chunky (thick
  limbs, big hands and head), and the motions are made large enough that at the main job's
  32x32 a hand is about 4 pixels across and a reach or rub moves it by several pixels.
  Thinner limbs and smaller motions made the moving parts so small next to the static
  picture that an RGB video network did not start to learn within the job's budget.
- Each synthetic person has a persistent style drawn from (seed, person id): body size
  and proportions, position, skin/hair/clothes/chair/background colours and background
  pattern, sleeve length, handedness, execution speed, amplitude, idle sway and
  breathing, rest pose. The same action therefore looks different across persons.
- Each clip adds its own execution: onset, duration, amplitude, phase, which hand, and a
  mild brightness change (+-3%) and shift (+-0.6% of the frame). Time is continuous, so any
  `num_frames` samples the same motion.
- Persons of the train, val and test splits are disjoint (ids 0-999, 1000-1999 and
  2000-2999), so held-out accuracy measures person independence. `subject` is the person id.
  The split `val_same_persons` is new clips (other executions, fixed by the seed) of the
  first training persons, as many as the test split has: the person gap is held-out minus
  same-persons accuracy.
- `training=True` draws each clip's execution from the item's augmentation seed (a new
  execution of the same person and action every epoch; `clips.item_key`) and flips half the
  clips horizontally (no class depends on left vs right); otherwise every item is fixed by
  the seed.

What it is not
- Not real video: no faces, no hand shapes beyond one finger, no occlusion other than
  drawing order, no camera motion, no audio. Accuracy on it says that a pipeline learns
  motion of the right body part across persons; it says nothing about MA-52 accuracy.
- Not to scale: relative to the body, limbs, hands and head are chunkier and the motions
  larger than a real person's micro-actions, so that they show at 32x32.

`export_ma52` writes a dataset as an MA-52-format folder (CRLF lists, H.264 MP4s) that
`MA52Dataset` reads back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.data.clips import check_repeats, item_key, labelled_clip_items
from models.data.labels import ACTION_TO_BODY, NUM_ACTIONS
from models.data.ma52 import write_h264_mp4

SPLITS = ("train", "val", "test")
# New clips of training persons (executions the train split never renders), as many persons as
# the test split has: accuracy there minus accuracy on the test persons is the person gap.
SAME_PERSONS_SPLIT = "val_same_persons"
DEFAULT_PERSONS_PER_SPLIT = {"train": 24, "val": 8, "test": 8}
PERSON_ID_BLOCK = 1000  # split i uses person ids [i * 1000, (i + 1) * 1000)


# ---------------------------------------------------------------------------------------
# The motion vocabulary: each class is a tuple of Moves (a pose parameter animated over
# the action) and Reaches (a hand, or both, travelling to a named point of the body).


@dataclass(frozen=True)
class Move:
    """Animate pose parameter `param` by `amplitude` (see `_Pose` for the parameters).
    envelope: "bump" (goes there and comes back), "hold" (goes there and stays) or
    "release" (starts there and leaves); `cycles > 0` oscillates inside the envelope."""

    param: str
    amplitude: float
    envelope: str = "bump"
    cycles: float = 0.0


@dataclass(frozen=True)
class Reach:
    """The active hand (or both hands, mirrored) travels to `anchor` (see `_anchor`), then
    rubs/scratches there with `rub = (amplitude, cycles, direction in radians)`; `behind`
    draws that arm behind the torso and head."""

    anchor: str
    both: bool = False
    envelope: str = "bump"
    rub: tuple[float, float, float] = (0.0, 0.0, 0.0)
    behind: bool = False


_H, _V, _D = 0.0, math.pi / 2, math.pi / 4  # rub directions: horizontal, vertical, diagonal

ACTION_MOTIONS: tuple[tuple, ...] = (
    # body 0-4
    (Move("sway", 0.12, cycles=3.0),),  # shaking body
    (Move("slump", 0.18, "release"), Move("rise", 0.04, "hold")),  # sitting straightly
    (Move("shrug", 0.14),),  # shrugging
    (Move("turn", 1.0), Move("sway", 0.06)),  # turning around
    (Move("rise", 0.14, "hold"),),  # rising up
    # head 5-10
    (Move("pitch", 1.0, "hold"),),  # bowing head
    (Move("pitch", -1.0, "hold"),),  # head up
    (Move("roll", 0.6, "hold"),),  # tilting head
    (Move("yaw", 1.0, "hold"),),  # turning head
    (Move("pitch", 0.8, cycles=2.5),),  # nodding
    (Move("yaw", 0.9, cycles=2.5),),  # shaking head
    # upper limb 11-23
    (Reach("other_arm", rub=(0.075, 4, _V)),),  # scratching arms
    (Reach("lap_front", both=True, rub=(0.0562, 3, _D)), Move("object", 1.0)),  # playing objects
    (Reach("together", both=True, envelope="hold"),),  # putting hands together
    (Reach("together", both=True, rub=(0.075, 4, _V)),),  # rubbing hands
    (Reach("chest_centre", rub=(0.0562, 2, _D)), Move("finger", 0.8, "hold")),  # pointing oneself
    (
        Reach("lap_front", envelope="hold"),
        Move("finger", -1.0, "hold"),
        Move("hand_size", -0.25, "hold"),
    ),  # clenching fist
    (Reach("overhead", both=True), Move("finger", 0.6)),  # stretching arms
    (Reach("side_out", both=True, envelope="release"),),  # retracting arms
    (Reach("wave", rub=(0.1313, 3, _H)),),  # waving
    (Reach("spread", both=True, envelope="hold"), Move("finger", 0.8, "hold")),  # spreading hands
    (Reach("fingertips", both=True, rub=(0.03, 3, _H)),),  # hands touching fingers
    (Reach("lap_front"), Move("wiggle", 1.3, cycles=4.0), Move("finger", 0.5)),  # other finger movements
    (Reach("gesture", rub=(0.1875, 1.5, _D)),),  # illustrative gestures
    # lower limb 24-31
    (Move("leg_shake", 0.09, cycles=5.0),),  # shaking legs
    (Move("feet_up", 0.18, "hold"),),  # curling legs
    (Move("knees_apart", 0.16, "hold"),),  # spread legs
    (Move("knees_apart", 0.16, "release"),),  # closing legs
    (Move("cross", 1.0, "hold"),),  # crossing legs
    (Move("feet_out", 1.0, "hold"),),  # stretching feet
    (Move("feet_out", 1.0, "release"),),  # retracting feet
    (Move("tiptoe", 1.0),),  # tiptoe
    # body-hand 32-37
    (Reach("neck", rub=(0.045, 3, _H)),),  # scratching or touching neck
    (Reach("chest", rub=(0.0562, 3, _V)),),  # ... chest
    (Reach("back", rub=(0.0562, 3, _V), behind=True),),  # ... back
    (Reach("other_shoulder", rub=(0.045, 3, _H)),),  # ... shoulder
    (Reach("hip", both=True, envelope="hold"),),  # arms akimbo
    (Reach("other_arm", both=True, envelope="hold"),),  # crossing arms
    # head-hand 38-47
    (Reach("hair", rub=(0.075, 2, _H)),),  # playing or tidying hair
    (Reach("hindbrain", rub=(0.045, 3, _V), behind=True),),  # scratching or touching hindbrain
    (Reach("forehead", rub=(0.045, 3, _H)),),  # ... forehead
    (Reach("cheek", rub=(0.045, 3, _V)),),  # ... face
    (Reach("eye", rub=(0.03, 4, _H)),),  # rubbing eyes
    (Reach("nose"),),  # touching nose
    (Reach("ear", rub=(0.03, 2, _V)),),  # touching ears
    (Reach("face", both=True),),  # covering face
    (Reach("mouth"),),  # covering mouth
    (Reach("bridge", rub=(0.0562, 1, _V)),),  # pushing glasses
    # leg-hand 48-51
    (Reach("thigh", rub=(0.0938, 4, _V)),),  # patting legs
    (Reach("knee"),),  # touching legs
    (Reach("thigh", rub=(0.045, 5, _H)),),  # scratching legs
    (Reach("foot", rub=(0.045, 3, _H)), Move("lean", 0.2)),  # scratching feet
)
assert len(ACTION_MOTIONS) == NUM_ACTIONS

_POSE_PARAMS = (
    "sway",
    "rise",
    "slump",
    "lean",
    "turn",
    "shrug",
    "pitch",
    "yaw",
    "roll",
    "finger",
    "wiggle",
    "hand_size",
    "object",
    "leg_shake",
    "feet_up",
    "knees_apart",
    "cross",
    "feet_out",
    "tiptoe",
)
for _motion in ACTION_MOTIONS:
    for _part in _motion:
        assert not isinstance(_part, Move) or _part.param in _POSE_PARAMS, _part


# ---------------------------------------------------------------------------------------
# Persons and clip executions.


@dataclass(frozen=True)
class PersonStyle:
    """Everything that stays the same for one synthetic person."""

    scale: float
    centre: tuple[float, float]
    torso_width: float
    torso_length: float
    head_radius: float
    arm_length: float
    leg_length: float
    skin: np.ndarray
    hair: np.ndarray
    shirt: np.ndarray
    sleeve: np.ndarray  # shirt colour for long sleeves, skin for short ones
    trousers: np.ndarray
    shoes: np.ndarray
    chair: np.ndarray
    background: np.ndarray  # (3,) base colour
    pattern: tuple  # background blobs: ((x, y, radius, colour), ...)
    handedness: int  # +1: the active hand is on the image's right, -1: left
    speed: float
    amplitude: float
    sway: float
    sway_cycles: float
    rest_hands: tuple[float, float]
    knee_gap: float


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(key) & 0xFFFFFFFF for key in keys])


def _colour(rng, saturation=(0.2, 0.8), value=(0.25, 0.9)) -> np.ndarray:
    hue = rng.uniform(0, 1)
    sat, val = rng.uniform(*saturation), rng.uniform(*value)
    rgb = np.clip(np.abs(((hue * 6 + np.array([0, 4, 2])) % 6) - 3) - 1, 0, 1)  # HSV -> RGB
    return (val * (1 - sat + sat * rgb)).astype(np.float32)


def make_person(seed: int, person_id: int) -> PersonStyle:
    rng = _rng(seed, person_id, 0x5E55)
    skin_tone = rng.uniform(0, 1)
    skin = np.array([0.95, 0.78, 0.65]) * (1 - skin_tone) + np.array([0.42, 0.28, 0.2]) * skin_tone
    shirt = _colour(rng)
    long_sleeves = rng.uniform() < 0.5
    return PersonStyle(
        scale=1.25 * rng.uniform(0.85, 1.05),
        centre=(0.5 + rng.uniform(-0.06, 0.06), 0.61 + rng.uniform(-0.02, 0.02)),
        torso_width=rng.uniform(0.85, 1.2),
        torso_length=rng.uniform(0.9, 1.1),
        head_radius=rng.uniform(0.095, 0.115),
        arm_length=rng.uniform(0.92, 1.08),
        leg_length=rng.uniform(0.9, 1.1),
        skin=skin.astype(np.float32),
        hair=_colour(rng, (0.2, 0.7), (0.05, 0.55)),
        shirt=shirt,
        sleeve=shirt if long_sleeves else skin.astype(np.float32),
        trousers=_colour(rng, (0.1, 0.6), (0.1, 0.6)),
        shoes=_colour(rng, (0.0, 0.5), (0.05, 0.4)),
        chair=_colour(rng, (0.1, 0.6), (0.2, 0.7)),
        background=_colour(rng, (0.05, 0.4), (0.5, 0.9)),
        pattern=tuple(
            (rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.35), _colour(rng, (0.05, 0.5), (0.4, 0.95)))
            for _ in range(rng.integers(1, 4))
        ),
        handedness=1 if rng.uniform() < 0.8 else -1,
        speed=rng.uniform(0.75, 1.3),
        amplitude=rng.uniform(0.75, 1.25),
        sway=rng.uniform(0.0, 0.006),
        sway_cycles=rng.uniform(0.3, 1.2),
        rest_hands=(rng.uniform(0.015, 0.045), rng.uniform(-0.06, -0.02)),
        knee_gap=rng.uniform(0.05, 0.09),
    )


@dataclass(frozen=True)
class Execution:
    """How one clip performs its action."""

    onset: float  # action start, as a fraction of the clip
    duration: float
    ramp: float  # time to reach / leave the pose
    amplitude: float
    phase: float
    side: int  # +1 / -1: which hand (and leg) is active
    brightness: float
    shift: tuple[float, float]
    idle_phase: float


def make_execution(person: PersonStyle, rng: np.random.Generator) -> Execution:
    duration = float(np.clip(rng.uniform(0.5, 0.75) / person.speed, 0.4, 0.85))
    onset = rng.uniform(0.03, max(0.04, 0.97 - duration))
    return Execution(
        onset=onset,
        duration=duration,
        ramp=min(0.3, 0.14 / person.speed) * rng.uniform(0.8, 1.2),
        amplitude=person.amplitude * rng.uniform(0.85, 1.15),
        phase=rng.uniform(0, 2 * math.pi),
        side=person.handedness if rng.uniform() < 0.85 else -person.handedness,
        brightness=rng.uniform(0.97, 1.03),
        shift=(rng.uniform(-0.006, 0.006), rng.uniform(-0.006, 0.006)),
        idle_phase=rng.uniform(0, 2 * math.pi),
    )


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _envelope(kind: str, time: np.ndarray, execution: Execution) -> np.ndarray:
    start, end, ramp = execution.onset, execution.onset + execution.duration, execution.ramp
    rise = _smoothstep((time - start) / ramp)
    if kind == "hold":
        return rise
    if kind == "release":
        return 1.0 - rise
    return rise * _smoothstep((end - time) / ramp)


def _oscillation(cycles: float, time: np.ndarray, execution: Execution) -> np.ndarray:
    """A sine with `cycles` periods over the action, at the clip's phase."""
    progress = (time - execution.onset) / execution.duration
    return np.sin(2 * math.pi * cycles * progress + execution.phase)


# ---------------------------------------------------------------------------------------
# Pose: body points per frame, in canvas units (x right, y down, [0, 1] across the image).


class _Pose:
    """Animated skeleton of one clip: every attribute is an array over frames."""

    def __init__(self, person: PersonStyle, execution: Execution, motion: tuple, time: np.ndarray):
        self.person, self.execution, self.time = person, execution, time
        self.side = execution.side
        amount = {name: np.zeros_like(time) for name in _POSE_PARAMS}
        for part in motion:
            if isinstance(part, Move):
                value = part.amplitude * execution.amplitude * _envelope(part.envelope, time, execution)
                if part.cycles:
                    value = value * _oscillation(part.cycles * person.speed, time, execution)
                amount[part.param] += value
        self.amount = amount
        self.unit = unit = person.scale
        cx, cy = person.centre[0] + execution.shift[0], person.centre[1] + execution.shift[1]
        idle = person.sway * np.sin(2 * math.pi * person.sway_cycles * time + execution.idle_phase)
        breathing = 0.004 * np.sin(2 * math.pi * 1.3 * time + execution.idle_phase * 2)

        # Lower body (the hip centre is the origin of the figure).
        self.hip = np.stack([np.full_like(time, cx), np.full_like(time, cy)])
        # Upper body: sways, rises, slumps; a forward lean (seen from the front) lowers it.
        sway = amount["sway"] + idle
        torso = 0.27 * person.torso_length * (1 - amount["slump"])
        self.neck_base = self.hip + unit * np.stack([sway, amount["lean"] + breathing - torso - amount["rise"]])
        # Turning narrows the shoulders (the torso seen from the side).
        half_width = 0.12 * person.torso_width * unit * (1 - 0.55 * np.abs(amount["turn"]))
        shrug = amount["shrug"] * unit
        self.shoulder = {s: self.neck_base + np.stack([s * half_width, 0.02 * unit - shrug]) for s in (1, -1)}
        self.torso_radius = 0.1 * person.torso_width * unit * (1 - 0.4 * np.abs(amount["turn"]))
        self.hip_top = self.hip + np.stack([0.6 * sway * unit, -0.02 * unit - amount["rise"] * unit * 0.5])
        # Head: pitch bows it (down), roll tilts it sideways.
        head_radius = person.head_radius * unit
        self.head_radius = head_radius
        pitch, roll = amount["pitch"], amount["roll"]
        self.yaw = np.clip(amount["yaw"] + amount["turn"] * self.side, -1.2, 1.2)
        self.pitch, self.roll = pitch, roll
        neck_length = 0.03 * unit
        self.head = self.neck_base + np.stack(
            [
                np.sin(roll) * (head_radius + neck_length) * self.side,
                -np.cos(roll) * (head_radius + neck_length) + 0.4 * pitch * head_radius,
            ]
        )
        # Legs: knees and feet of each side.
        leg = person.leg_length * unit
        self.knee, self.foot, self.toe = {}, {}, {}
        for s in (1, -1):
            active = 1.0 if s == self.side else 0.0
            gap = person.knee_gap + amount["knees_apart"]
            shake = amount["leg_shake"] * active
            cross = amount["cross"] * active
            knee_x = s * gap * (1 - 1.6 * cross) + shake
            self.knee[s] = self.hip + np.stack([knee_x * unit, (0.09 + 0.3 * amount["rise"]) * leg])
            foot_x = s * (gap + 0.005) * (1 - 2.0 * cross) + 0.6 * shake
            foot_y = 0.26 - amount["feet_up"] + 0.06 * amount["feet_out"] - 0.045 * amount["tiptoe"]
            self.foot[s] = self.hip + np.stack([foot_x * unit, foot_y * leg])
            toe_dx = s * 0.035 * (1 - 0.8 * amount["tiptoe"]) * (1 + 0.6 * amount["feet_out"])
            toe_dy = 0.04 * amount["tiptoe"] + 0.02 * amount["feet_out"]
            self.toe[s] = self.foot[s] + np.stack([toe_dx * unit, toe_dy * leg])
        self.foot_radius = 0.037 * leg * (1 + 0.5 * amount["feet_out"])

    def anchor(self, name: str, s: int) -> np.ndarray:
        """Point `name` of `_ANCHORS` for the hand on side `s`; it follows the moving body."""
        if name == "rest":
            base, (dx, dy), unit = self.hip, self.person.rest_hands, self.unit
        else:
            base_name, dx, dy, unit_name = _ANCHORS[name]
            base = {
                "hip": lambda: self.hip,
                "hip_top": lambda: self.hip_top,
                "neck": lambda: self.neck_base,
                "head": lambda: self.head,
                "shoulder": lambda: self.shoulder[s],
                "other_shoulder": lambda: self.shoulder[-s],
                "knee": lambda: self.knee[s],
                "thigh": lambda: 0.5 * (self.hip + self.knee[s]),
                "foot": lambda: self.foot[s],
            }[base_name]()
            unit = self.head_radius if unit_name == "head" else self.unit
        return base + np.stack([np.full_like(self.time, s * dx * unit), np.full_like(self.time, dy * unit)])


# Hand targets: name -> (body point, dx, dy, unit). dx points away from the body's midline
# on the hand's own side (mirrored for the other hand); dy points down; "body" units are
# the person's scale, "head" units the head radius.
_ANCHORS = {
    "lap_front": ("hip", 0.035, -0.06, "body"),
    "together": ("hip", 0.012, -0.12, "body"),
    "fingertips": ("hip", 0.028, -0.14, "body"),
    "back": ("hip", 0.11, -0.13, "body"),
    "hip": ("hip_top", 0.1, -0.04, "body"),
    "chest_centre": ("neck", 0.02, 0.09, "body"),
    "gesture": ("neck", 0.09, 0.14, "body"),
    "neck": ("neck", 0.012, -0.01, "body"),
    "chest": ("neck", 0.05, 0.07, "body"),
    "overhead": ("shoulder", 0.05, -0.26, "body"),
    "side_out": ("shoulder", 0.24, 0.06, "body"),
    "spread": ("shoulder", 0.17, 0.15, "body"),
    "wave": ("shoulder", 0.1, -0.16, "body"),
    "other_arm": ("other_shoulder", 0.01, 0.08, "body"),
    "other_shoulder": ("other_shoulder", 0.01, 0.0, "body"),
    "hair": ("head", 0.3, -1.15, "head"),
    "hindbrain": ("head", 0.85, -0.75, "head"),
    "forehead": ("head", 0.1, -0.6, "head"),
    "eye": ("head", 0.4, -0.15, "head"),
    "bridge": ("head", 0.0, -0.2, "head"),
    "nose": ("head", 0.0, 0.15, "head"),
    "mouth": ("head", 0.0, 0.5, "head"),
    "cheek": ("head", 0.6, 0.3, "head"),
    "face": ("head", 0.35, 0.1, "head"),
    "ear": ("head", 1.05, 0.0, "head"),
    "thigh": ("thigh", 0.04, 0.0, "body"),
    "knee": ("knee", 0.0, -0.005, "body"),
    "foot": ("foot", 0.0, -0.02, "body"),
}
for _motion in ACTION_MOTIONS:
    for _part in _motion:
        assert not isinstance(_part, Reach) or _part.anchor in _ANCHORS, _part


def _hand_paths(pose: _Pose, motion: tuple) -> dict[int, tuple[np.ndarray, bool]]:
    """Hand centre per side (2, T) and whether that arm is drawn behind the body."""
    execution, time = pose.execution, pose.time
    hands = {s: (pose.anchor("rest", s), False) for s in (1, -1)}
    for part in motion:
        if not isinstance(part, Reach):
            continue
        sides = (1, -1) if part.both else (pose.side,)
        weight = _envelope(part.envelope, time, execution)
        amplitude, cycles, direction = part.rub
        rub = 0.0
        if amplitude:
            # The rub lives inside the reach: it fades in and out with it.
            rub = (
                amplitude
                * execution.amplitude
                * pose.unit
                * weight
                * _oscillation(cycles * pose.person.speed, time, execution)
            )
        for s in sides:
            target = pose.anchor(part.anchor, s)
            path = hands[s][0] + weight * (target - hands[s][0])
            if amplitude:
                path = path + np.stack([rub * math.cos(direction) * s, rub * math.sin(direction)])
            hands[s] = (path, part.behind)
    return hands


def _elbow(shoulder: np.ndarray, hand: np.ndarray, upper: float, fore: float, s: int):
    """Two-bone inverse kinematics: the elbow bends outwards (towards side `s`). Returns
    the elbow and the hand moved within reach."""
    delta = hand - shoulder
    distance = np.maximum(np.hypot(delta[0], delta[1]), 1e-6)
    reach = np.clip(distance, abs(upper - fore) + 1e-4, upper + fore - 1e-4)
    direction = delta / distance
    hand = shoulder + direction * reach
    along = (upper**2 - fore**2 + reach**2) / (2 * reach)
    height = np.sqrt(np.maximum(upper**2 - along**2, 0.0))
    normal = np.stack([-direction[1], direction[0]])
    normal = normal * np.where(normal[0] * s >= 0, 1.0, -1.0)
    return shoulder + direction * along + normal * height, hand


# ---------------------------------------------------------------------------------------
# Rasterization: anti-aliased capsules (segments with a radius; a disc is a capsule of
# length zero), painted in order, each over the bounding box it covers in the clip.


def _clip_unit(values: np.ndarray) -> None:
    """`np.clip(values, 0, 1, out=values)` without np.clip's dispatch overhead."""
    np.maximum(values, 0.0, out=values)
    np.minimum(values, 1.0, out=values)


class _Canvas:
    def __init__(self, background: np.ndarray, num_frames: int):
        self.size = background.shape[0]
        self.image = np.broadcast_to(background, (num_frames,) + background.shape).copy()
        self.grid = (np.arange(self.size, dtype=np.float32) + 0.5) / self.size

    def capsule(self, start, end, radius, colour) -> None:
        """Paint a capsule from `start` to `end` ((2, T) canvas points) with `radius`
        (scalar or (T,)) in `colour` (3,)."""
        # The clips are small (the main job's are 8x32x32), so the cost is numpy's per-call
        # overhead: few calls, in-place where a temporary is not needed.
        size = self.size
        radius = np.broadcast_to(np.asarray(radius, dtype=np.float32), start[0].shape)
        pad = radius.max() + 1.5 / size
        low, high = np.minimum(start, end).min(axis=1), np.maximum(start, end).max(axis=1)
        x0 = max(int((low[0] - pad) * size), 0)
        x1 = min(int(math.ceil((high[0] + pad) * size)), size)
        y0 = max(int((low[1] - pad) * size), 0)
        y1 = min(int(math.ceil((high[1] + pad) * size)), size)
        if x0 >= x1 or y0 >= y1:
            return
        start32 = start.astype(np.float32)
        px = self.grid[None, None, x0:x1] - start32[0][:, None, None]
        py = self.grid[None, y0:y1, None] - start32[1][:, None, None]
        bx = (end[0] - start[0]).astype(np.float32)[:, None, None]
        by = (end[1] - start[1]).astype(np.float32)[:, None, None]
        if bx.any() or by.any():
            # Distance to the segment: project onto it, clamp to its ends.
            along = px * bx + py * by
            along *= 1.0 / (bx * bx + by * by + 1e-12)
            _clip_unit(along)
            px = px - along * bx
            py = py - along * by
        distance = np.sqrt(px * px + py * py)
        # Anti-aliasing: coverage ramps from 1 to 0 across the pixel at the edge.
        distance *= size
        coverage = (radius[:, None, None] * size + 0.5) - distance
        _clip_unit(coverage)
        region = self.image[:, y0:y1, x0:x1]
        region += coverage[..., None] * (colour - region)

    def disc(self, centre, radius, colour) -> None:
        self.capsule(centre, centre, radius, colour)


def _background(person: PersonStyle, size: int) -> np.ndarray:
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    image = np.broadcast_to(person.background, (size, size, 3)).copy()
    image *= (0.85 + 0.3 * grid)[:, None, None]  # a vertical light gradient
    for x, y, radius, colour in person.pattern:
        distance = np.hypot(grid[None, :] - x, grid[:, None] - y)
        weight = np.clip(1.0 - distance / radius, 0.0, 1.0)[..., None] * 0.1
        image += weight * (colour - image)
    # The chair is static, so it belongs to the background.
    canvas = _Canvas(np.clip(image, 0.0, 1.0), 1)
    cx, cy, u = person.centre[0], person.centre[1], person.scale

    def point(x, y):
        return np.array([[x], [y]], dtype=np.float32)

    canvas.capsule(point(cx - 0.1 * u, cy - 0.3 * u), point(cx + 0.1 * u, cy - 0.3 * u), 0.09 * u, person.chair)
    canvas.capsule(
        point(cx - 0.15 * u, cy + 0.03 * u), point(cx + 0.15 * u, cy + 0.03 * u), 0.03 * u, person.chair * 0.8
    )
    return canvas.image[0]


def render_clip(
    person: PersonStyle,
    execution: Execution,
    action: int | None,
    num_frames: int,
    size: int,
    background: np.ndarray | None = None,
) -> np.ndarray:
    """`(num_frames, size, size, 3)` float32 RGB in [0, 1] of `person` doing `action`
    (None: sitting idle, with only the person's sway and breathing)."""
    motion = () if action is None else ACTION_MOTIONS[action]
    time = ((np.arange(num_frames) + 0.5) / num_frames).astype(np.float32)
    pose = _Pose(person, execution, motion, time)
    amount, u, side = pose.amount, pose.unit, pose.side
    canvas = _Canvas(_background(person, size) if background is None else background, num_frames)
    still = np.zeros_like(time)

    def point(x, y):
        return np.stack([still + x, still + y])

    # Legs; the crossing leg is drawn last.
    leg_order = (-side, side)
    for s in leg_order:
        hip_joint = pose.hip + np.stack([still + s * 0.05 * u, still])
        canvas.capsule(hip_joint, pose.knee[s], 0.09 * u, person.trousers)
        canvas.capsule(pose.knee[s], pose.foot[s], 0.066 * u, person.trousers * 0.9)
        canvas.capsule(pose.foot[s], pose.toe[s], pose.foot_radius, person.shoes)

    hands = _hand_paths(pose, motion)
    arm_upper, arm_fore = 0.15 * person.arm_length * u, 0.15 * person.arm_length * u
    hand_radius = 0.057 * u * (1 + amount["hand_size"])
    finger_length = 0.028 * u * np.clip(0.5 + amount["finger"], 0.0, 1.5)

    def draw_arm(s):
        hand_target, _ = hands[s]
        elbow, hand = _elbow(pose.shoulder[s], hand_target, arm_upper, arm_fore, s)
        # Arms a shade darker than the torso, so a hand in front of the body stands out.
        canvas.capsule(pose.shoulder[s], elbow, 0.053 * u, person.shirt * 0.8)
        canvas.capsule(elbow, hand, 0.042 * u, person.sleeve * 0.85)
        # The finger points along the forearm, wiggling for "other finger movements".
        forearm = (hand - elbow) / np.maximum(np.hypot(*(hand - elbow)), 1e-6)
        angle = 0.9 * amount["wiggle"] if s == side else 0.0
        direction = np.stack(
            [
                forearm[0] * np.cos(angle) - forearm[1] * np.sin(angle),
                forearm[0] * np.sin(angle) + forearm[1] * np.cos(angle),
            ]
        )
        hand_scale = hand_radius if s == side else 0.057 * u
        fingers = finger_length if s == side else 0.014 * u
        canvas.capsule(hand, hand + direction * (hand_scale + fingers), 0.018 * u, person.skin * 0.92)
        canvas.disc(hand, hand_scale, person.skin)

    for s in (1, -1):
        if hands[s][1]:
            draw_arm(s)

    # Torso, shoulders, neck.
    canvas.capsule(pose.hip_top, pose.neck_base + np.stack([still, still + 0.05 * u]), pose.torso_radius, person.shirt)
    canvas.capsule(pose.shoulder[1], pose.shoulder[-1], 0.035 * u, person.shirt)
    canvas.capsule(pose.neck_base, pose.head, 0.025 * u, person.skin * 0.95)

    # Head: hair shows where the face turns away from; eyes and mouth show the face's direction.
    r = pose.head_radius
    cos_roll, sin_roll = np.cos(pose.roll), np.sin(pose.roll) * side

    def head_point(dx, dy):
        return pose.head + np.stack([(cos_roll * dx - sin_roll * dy) * r, (sin_roll * dx + cos_roll * dy) * r])

    yaw, pitch = pose.yaw, pose.pitch
    canvas.disc(head_point(-0.4 * yaw, -0.28 + 0.4 * pitch), r, person.hair)
    canvas.disc(head_point(0.1 * yaw, 0.12 + 0.1 * pitch), 0.88 * r, person.skin)
    eye_y = -0.05 + 0.6 * pitch
    for eye in (-1, 1):
        canvas.disc(
            head_point(0.6 * yaw + eye * 0.36 * (1 - 0.45 * np.abs(yaw)), eye_y),
            0.13 * r,
            np.array([0.08, 0.06, 0.06], np.float32),
        )
    mouth_y = 0.5 + 0.5 * pitch
    canvas.capsule(
        head_point(0.6 * yaw - 0.22, mouth_y),
        head_point(0.6 * yaw + 0.22, mouth_y),
        0.07 * r,
        np.array([0.55, 0.15, 0.15], np.float32),
    )

    for s in (1, -1):
        if not hands[s][1]:
            draw_arm(s)

    if amount["object"].any():
        # "Playing objects": a small bright object between the hands.
        middle = 0.5 * (hands[1][0] + hands[-1][0]) + np.stack([still, still - 0.02 * u])
        visible = amount["object"] > 0.3
        radius = np.where(visible, 0.02 * u, 0.0)
        canvas.capsule(
            middle - np.stack([still + 0.012 * u, still]),
            middle + np.stack([still + 0.012 * u, still]),
            radius,
            np.array([0.95, 0.85, 0.1], np.float32),
        )

    image = canvas.image
    image *= execution.brightness
    return np.clip(image, 0.0, 1.0, out=image)


# ---------------------------------------------------------------------------------------
# The dataset.


def _split_persons(split: str, persons_per_split) -> list[int]:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if isinstance(persons_per_split, int):
        count = persons_per_split
    else:
        if split not in persons_per_split:
            raise ValueError(
                f"persons_per_split: expected an int or a mapping with key {split!r}, got {persons_per_split!r}"
            )
        count = persons_per_split[split]
    if not 1 <= int(count) <= PERSON_ID_BLOCK:
        raise ValueError(f"persons_per_split[{split!r}]: expected 1..{PERSON_ID_BLOCK}, got {count}")
    first = SPLITS.index(split) * PERSON_ID_BLOCK
    return list(range(first, first + int(count)))


class SyntheticMicroActions(torch.utils.data.Dataset):
    """Synthetic micro-action clips (see the module docstring). Items:
    `{"clip": float32 (num_frames, size, size, 3) RGB in [0, 1], "label", "body", "subject"
    (the person id), "index"}` (a list of `repeats` of them with repeated augmentation);
    ordered by person, then action, then clip; `key` as in `clips.item_key`. Attributes mirror
    `MA52Dataset`: `names` (MA-52 style: `SSSS_BB_CCCC.mp4` for
    train/val, `testNNNN.mp4` for test), `labels`, `bodies`, `subjects`, `persons`,
    `failed` (always empty)."""

    def __init__(
        self,
        split: str,
        num_frames: int = 16,
        size: int = 112,
        seed: int = 0,
        persons_per_split=None,
        clips_per_person_class: int = 1,
        training: bool = False,
        repeats: int = 1,
    ):
        persons_per_split = DEFAULT_PERSONS_PER_SPLIT if persons_per_split is None else persons_per_split
        if split == SAME_PERSONS_SPLIT:
            train_persons = _split_persons("train", persons_per_split)
            self.persons = train_persons[: len(_split_persons("test", persons_per_split))]
        else:
            self.persons = _split_persons(split, persons_per_split)
        if num_frames < 1:
            raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
        if size < 16:
            raise ValueError(f"size: expected >= 16 pixels, got {size}")
        if clips_per_person_class < 1:
            raise ValueError(f"clips_per_person_class: expected >= 1, got {clips_per_person_class}")
        self.split, self.num_frames, self.size, self.seed = split, num_frames, size, seed
        self.clips_per_person_class = clips_per_person_class
        self.training = training
        self.repeats = check_repeats(repeats, training)
        self._styles = {person: make_person(seed, person) for person in self.persons}
        self._backgrounds: dict[int, np.ndarray] = {}

        self.labels, self.subjects, self.names = [], [], []
        for person in self.persons:
            for action in range(NUM_ACTIONS):
                for clip in range(clips_per_person_class):
                    running = action * clips_per_person_class + clip + 1
                    self.names.append(f"{person:04d}_{ACTION_TO_BODY[action]:02d}_{running:04d}.mp4")
                    self.labels.append(action)
                    self.subjects.append(person)
        if split == "test":
            self.names = [f"test{index:04d}.mp4" for index in range(len(self.labels))]
        self.bodies = [ACTION_TO_BODY[label] for label in self.labels]
        self.failed: list[str] = []

    def __len__(self) -> int:
        return len(self.labels)

    def frames(self, index: int, num_frames: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        """Item `index` as `(T, size, size, 3)` float32 RGB in [0, 1] (T = `num_frames`,
        default the dataset's), without training-time flips. The clip's execution is drawn
        from `rng` when given (a training draw), else fixed by the seed."""
        if not 0 <= index < len(self):
            raise IndexError(f"index: expected 0 <= index < {len(self)}, got {index}")
        person = self.subjects[index]
        style = self._styles[person]
        clip = index % self.clips_per_person_class
        salt = 0x5A3E if self.split == SAME_PERSONS_SPLIT else 0xC11F  # other executions of the same persons
        execution = make_execution(style, rng or _rng(self.seed, person, self.labels[index], clip, salt))
        if person not in self._backgrounds:
            self._backgrounds[person] = _background(style, self.size)
        return render_clip(
            style, execution, self.labels[index], num_frames or self.num_frames, self.size, self._backgrounds[person]
        )

    def __getitem__(self, key):
        index, rng = item_key(key, self.training)
        # Frames fill the crop: the crop only draws the flip (and, repeated, one render gives k flips).
        return labelled_clip_items(self, index, self.frames(index, rng=rng), rng)


def export_ma52(source, root, frames_per_video: int = 48, fps: int = 30, hide_test_labels: bool = False) -> Path:
    """Write synthetic data as an MA-52-format folder that `MA52Dataset` reads:
    `root/{split}_list_videos.txt` (CRLF line ends; the test list without a final newline,
    as in the official release) and `root/{split}/<name>.mp4` (H.264, `frames_per_video`
    frames at `fps`; when that is an odd multiple of the reader's `num_frames`, as the
    default 48 is of 16, MA52Dataset's sampling lands exactly on the instants the dataset
    itself renders).

    `source`: a `SyntheticMicroActions` (writes its split), a sequence of them, or a dict
    of `SyntheticMicroActions` keyword arguments (writes train, val and test with them).
    `hide_test_labels=True` writes dummy zeros as test labels, like the official list.
    Returns `root`."""
    if isinstance(source, SyntheticMicroActions):
        datasets = [source]
    elif isinstance(source, dict):
        arguments = {key: value for key, value in source.items() if key not in ("split", "training")}
        datasets = [SyntheticMicroActions(split, **arguments) for split in SPLITS]
    else:
        datasets = list(source)
        if not all(isinstance(dataset, SyntheticMicroActions) for dataset in datasets):
            raise TypeError(
                "source: expected a SyntheticMicroActions, a sequence of them or a dict of "
                f"their keyword arguments, got {type(source).__name__}"
            )
    if any(dataset.training for dataset in datasets):
        raise ValueError(
            "source: expected datasets with training=False (training=True draws a new "
            "execution on every read, so the export would not match the dataset)"
        )
    if frames_per_video < 1:
        raise ValueError(f"frames_per_video: expected >= 1, got {frames_per_video}")
    root = Path(root)
    for dataset in datasets:
        if dataset.size % 2:
            raise ValueError(f"source: H.264 needs an even frame size, got size {dataset.size}")
        video_dir = root / dataset.split
        video_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for index, (name, label) in enumerate(zip(dataset.names, dataset.labels)):
            frames = dataset.frames(index, frames_per_video)
            write_h264_mp4(video_dir / name, (frames * 255).round().astype(np.uint8), fps=fps)
            lines.append(f"{name} {0 if hide_test_labels and dataset.split == 'test' else label}")
        text = "\r\n".join(lines) + ("" if dataset.split == "test" else "\r\n")
        (root / f"{dataset.split}_list_videos.txt").write_bytes(text.encode("ascii"))
    return root
