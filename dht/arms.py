"""Arms: the architecture choices of Section 6.1 as params.yaml writes them, segments of
(layers, heads) such as 6L8H or 4L8H+2L12H (docs/paper-notes.md, row 3), and the per-layer plan an arm runs."""

from __future__ import annotations

import re
from dataclasses import dataclass

_ARM_PART = re.compile(r"(\d+)L(\d+)H")


@dataclass(frozen=True)
class Arm:
    """An architecture choice, as printed in Section 6.1: segments of (layers, heads), e.g. 4L8H+2L12H."""

    segments: tuple[tuple[int, int], ...]

    @property
    def num_layers(self) -> int:
        return sum(n for n, _ in self.segments)

    def heads_per_layer(self) -> list[int]:
        return [h for n, h in self.segments for _ in range(n)]

    def __str__(self) -> str:
        return "+".join(f"{n}L{h}H" for n, h in self.segments)

    def layer_heads(self, fixed_layers: int, num_heads: int) -> list[int]:
        """Heads each layer really runs: the first b layers always run every head (Section 4.2), the rest follow
        the segments (4L8H+2L12H with b = 3: 12, 12, 12, 8, 12, 12)."""
        return [num_heads if layer < fixed_layers else h for layer, h in enumerate(self.heads_per_layer())]

    def runs_as(self, fixed_layers: int, num_heads: int) -> Arm:
        """The plan this arm really runs (:meth:`layer_heads`) as an arm, segments of equal heads merged:
        1L8H+2L12H with b = 3 runs as 3L12H."""
        heads = self.layer_heads(fixed_layers, num_heads)
        merged: list[list[int]] = []
        for h in heads:
            if merged and merged[-1][1] == h:
                merged[-1][0] += 1
            else:
                merged.append([1, h])
        return Arm(tuple((n, h) for n, h in merged))


def parse_arm(text: str) -> Arm:
    """Parse "6L8H" or "4L8H+2L12H" into an :class:`Arm`; raise ValueError on anything else."""
    parts = text.replace(" ", "").split("+")
    segments = []
    for part in parts:
        m = _ARM_PART.fullmatch(part)
        if not m:
            raise ValueError(
                f"'{text}' is not an arm: write <layers>L<heads>H, optionally joined by '+', "
                "e.g. 6L8H or 4L8H+2L12H"
            )
        segments.append((int(m.group(1)), int(m.group(2))))
    return Arm(tuple(segments))
