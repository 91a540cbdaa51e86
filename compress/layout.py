"""Where each visual token sits in the image: grids (segments) and layout tokens (newlines).

A LLaVA-1.5 image is one 24x24 segment. A LLaVA-NeXT image is a base segment followed by the unpadded
anyres crops, whose rows each end with an image-newline token. Token ``(r, c)`` of a segment sits at sequence
index ``offset + r * row_stride + c``. A video (docs/design.md §5, video) is one segment per temporal step; ``time``
is that step's temporal rotary position (0 for images and for 1-D families).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Segment:
    name: str
    height: int
    width: int
    offset: int
    row_stride: int
    time: int = 0

    def indices(self) -> list[int]:
        """Sequence indices of the grid cells, row-major."""
        return [self.offset + r * self.row_stride + c for r in range(self.height) for c in range(self.width)]


@dataclass(frozen=True)
class Layout:
    num_tokens: int
    segments: tuple[Segment, ...]
    newlines: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def grid(cls, height: int, width: int) -> "Layout":
        """A single ``height x width`` grid, the LLaVA-1.5 case."""
        return cls(height * width, (Segment("base", height, width, 0, width),))

    @classmethod
    def sequence(cls, n: int) -> "Layout":
        """No known geometry: one segment of one row."""
        return cls(n, (Segment("base", 1, n, 0, n),))

    def to_dict(self) -> dict:
        # ``time`` only when set: image layouts serialise (and hash) as before videos existed
        segments = [{k: v for k, v in asdict(s).items() if k != "time" or v} for s in self.segments]
        return {"num_tokens": self.num_tokens, "segments": segments,
                "newlines": list(self.newlines)}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(int(d["num_tokens"]), tuple(Segment(**s) for s in d["segments"]),
                   tuple(int(i) for i in d.get("newlines", ())))

    def validate(self) -> None:
        seen = [i for s in self.segments for i in s.indices()] + list(self.newlines)
        if sorted(seen) != list(range(self.num_tokens)):
            raise ValueError(f"layout does not cover tokens 0..{self.num_tokens - 1} exactly once: {self.to_dict()}")


def default_layout(n: int) -> Layout:
    """A square grid when ``n`` is a square (LLaVA-1.5), otherwise one row."""
    side = math.isqrt(n)
    return Layout.grid(side, side) if side * side == n else Layout.sequence(n)
