"""The input contract of a fusion model: float32 NCHW, fixed channels, H, W and batch in range."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from resfuse.errors import InputContractError


@dataclass(frozen=True)
class Range:
    min: int
    max: int | None = None  # None: no upper bound (the PyTorch model itself has none)

    def __contains__(self, value: int) -> bool:
        return value >= self.min and (self.max is None or value <= self.max)

    def clamp(self, value: int) -> int:
        """The nearest value inside the range."""
        return max(self.min, value if self.max is None else min(value, self.max))

    def describe(self) -> str:
        return f"{self.min}..{self.max}" if self.max is not None else f">= {self.min}"


@dataclass(frozen=True)
class InputContract:
    channels: int
    height: Range
    width: Range
    batch: Range = Range(1)
    dtype: str = "float32"

    def check(self, shape: Sequence[int], dtype: str, *, spatial: bool = True) -> None:
        """Raise InputContractError naming the first broken rule and how to fix the input;
        `spatial=False` leaves H, W and batch to tiled inference, which cuts them to size."""
        shape = tuple(int(d) for d in shape)
        if len(shape) != 4:
            hint = " (add a batch dimension: x[None])" if len(shape) == 3 else ""
            raise InputContractError(
                f"expected a 4-D NCHW tensor (batch, {self.channels}, H, W), "
                f"got shape {shape}{hint}"
            )
        b, c, h, w = shape
        if c != self.channels:
            hint = " (channels-last input? use x.permute(0, 3, 1, 2))" if w == self.channels else ""
            raise InputContractError(
                f"expected {self.channels} input channels, got {c} in shape {shape}{hint}"
            )
        if dtype != self.dtype:
            raise InputContractError(
                f"expected dtype {self.dtype}, got {dtype}; convert with .float() / "
                f".astype(numpy.float32)"
            )
        if not spatial:
            return
        for name, value, allowed in (("height", h, self.height), ("width", w, self.width)):
            if value not in allowed:
                raise InputContractError(
                    f"input {name} {value} is outside the allowed range {allowed.describe()}; "
                    f"run it in tiles (tile='auto', --tile auto) or resize it into that range"
                )
        if b not in self.batch:
            fix = (
                "pass at least one image"
                if b < self.batch.min
                else (f"split the batch into chunks of at most {self.batch.max}")
            )
            raise InputContractError(
                f"batch size {b} is outside the allowed range {self.batch.describe()}; {fix}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputContract:
        return cls(
            channels=int(data["channels"]),
            height=Range(**data["height"]),
            width=Range(**data["width"]),
            batch=Range(**data["batch"]),
            dtype=str(data["dtype"]),
        )
