"""The names the hybrid schedule works with: the three update kinds and the field's three parameter groups.

Both are ``str`` enums (fourdfy/enums.py): a member equals (and hashes as) its value, so
``UpdateKind.VIDEO == "vid"``, a dict keyed by members answers to the plain strings of older checkpoints and
logs, and ``json.dumps``, ``str()`` and f-strings write the bare value ("vid").
"""

from __future__ import annotations

from fourdfy.enums import StrChoice


class UpdateKind(StrChoice):
    """Which prior makes an update (paper Algorithm 1)."""

    MULTIVIEW = "3d"  # 3D-aware text-to-image SDS (MVDream): 4 views
    IMAGE = "img"  # text-to-image VSD (Stable Diffusion 2.1 + camera LoRA): 1 view
    VIDEO = "vid"  # text-to-video SDS (Zeroscope): one camera, 16 frames; the only kind that trains "dynamic"


class ParamGroup(StrChoice):
    """The field's parameters by role (one optimiser group each; the background trains with the heads)."""

    STATIC = "static"  # 3D hash grid (or HexPlane's spatial planes)
    DYNAMIC = "dynamic"  # 4D hash grid (or HexPlane's time planes)
    HEADS = "heads"  # density and colour MLPs, and the background


UPDATE_KINDS: tuple[UpdateKind, ...] = tuple(UpdateKind)  # the order in which a kind is drawn from [0, 1)
PARAM_GROUPS: tuple[ParamGroup, ...] = tuple(ParamGroup)
