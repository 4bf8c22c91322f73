"""Fixed-point quantisation of a model delta into the ring Z/2^32, where secure aggregation's masks live.

Masks cancel only in modular integer arithmetic, so each client turns its weighted float update
into integers first; the sum of the integers, read back as int32, is the scaled sum of the
updates. The range each tensor may take follows from the clip norm and the number of clients, so
no sum ever wraps, and a value outside it is refused with its tensor's name, never clipped.
Pure numpy: no torch, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedtrain.contract.errors import BadDataError, BadInputError


class QuantisationRangeError(BadDataError):
    """A value outside the quantisation range: names the tensor, the value, the bound and the setting to raise.

    Never clipped silently: a clipped value would make the sum wrong by an amount nobody sees.
    """


_INT32_MAX = 2**31 - 1


def _scale(max_clients: int, bound: float) -> int:
    """The largest integer scale with max_clients values of at most ``bound`` summing within int32.

    floor(floor((2^31 - 1) / max_clients) / bound): the inner floor keeps a value rounded up by
    ``rint`` within a client's share of the range, so no sum ever wraps.
    """
    return math.floor((_INT32_MAX // max_clients) / bound)


@dataclass(frozen=True)
class QuantisationPlan:
    """How a model delta becomes a uint32 vector in Z/2^32, and back: one element per weight, plus the weight.

    A client's weighted delta ``w·d`` (w in (0, 1], ||d|| <= clip norm) has every float coordinate
    within ±clip norm, and an integer tensor's (BatchNorm's counters) within ±integer_range, so each
    tensor's scale follows from the settings and the model: the sum of ``max_clients`` such values
    never leaves int32, and nothing needs tuning by hand. Tensors are in sorted name order, so
    both sides lay out the same vector whatever order their dicts hold. The masked upload is as
    large as the float32 model (one 4-byte element each).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    scales: tuple[int, ...]
    max_clients: int
    clip_norm: float
    integer_range: float = 2.0**16

    @classmethod
    def for_model(cls, template: Mapping[str, NDArray[Any]], clip_norm: float, max_clients: int,
                  integer_range: float = 2.0**16) -> QuantisationPlan:
        """The plan of a model whose tensors are ``template``'s (names, shapes, dtypes)."""
        if not template:
            raise BadInputError("secure aggregation needs a model with at least one tensor")
        for setting, value in (("clip norm", clip_norm), ("integer range", integer_range)):
            if not math.isfinite(value) or value <= 0:
                raise BadInputError(f"secure aggregation's {setting} must be a positive number, got {value}")
        if max_clients < 1:
            raise BadInputError(f"secure aggregation needs max_clients >= 1, got {max_clients}")
        names = tuple(sorted(template))
        dtypes = tuple(np.asarray(template[name]).dtype for name in names)
        for name, dtype in zip(names, dtypes, strict=True):
            if dtype.kind not in "fiu":
                raise BadInputError(f"secure aggregation cannot quantise tensor {name} of dtype {dtype}")
        bounds = [clip_norm if dtype.kind == "f" else integer_range for dtype in dtypes]
        scales = tuple(_scale(max_clients, bound) for bound in bounds)
        if min(scales) < 1 or _scale(max_clients, 1.0) < 1:
            raise BadInputError(f"secure aggregation: {max_clients} clients with clip norm {clip_norm} (integer range "
                                f"{integer_range}) leave no 32-bit quantisation step; lower them")
        return cls(names, tuple(tuple(np.shape(template[n])) for n in names), tuple(d.name for d in dtypes),
                   scales, max_clients, float(clip_norm), float(integer_range))

    @property
    def length(self) -> int:
        """Number of uint32 elements: every tensor element and the weight."""
        return sum(math.prod(shape) for shape in self.shapes) + 1

    @property
    def weight_scale(self) -> int:
        """The weight element's scale (its range is 1)."""
        return _scale(self.max_clients, 1.0)

    @property
    def bounds(self) -> tuple[float, ...]:
        """Per tensor, the largest |w·d| it may hold: the clip norm (float tensors) or the integer range."""
        return tuple(self.clip_norm if np.dtype(dtype).kind == "f" else self.integer_range for dtype in self.dtypes)

    def error_bound(self, weight_sum: float) -> dict[str, float]:
        """Per tensor, the largest error of the weighted mean ``sum(w·d) / sum(w)`` after dequantisation.

        Each client rounds each value by at most half a step (0.5/scale), its weight likewise (0.5/
        weight_scale); with ``m = max_clients`` and W the dequantised weight sum, the mean is off by at
        most ``(m·0.5/scale + bound·m·0.5/weight_scale) / W``, the second term from W's own error.
        """
        if not weight_sum > 0:
            raise BadInputError(f"the weight sum must be positive, got {weight_sum}")
        weight_error = self.max_clients * 0.5 / self.weight_scale
        return {name: (self.max_clients * 0.5 / scale + bound * weight_error) / weight_sum
                for name, scale, bound in zip(self.names, self.scales, self.bounds, strict=True)}

    def quantise(self, delta: Mapping[str, NDArray[Any]], weight: float) -> NDArray[np.uint32]:
        """``weight · delta`` as the plan's uint32 vector, the weight last; out-of-range values are refused."""
        if set(delta) != set(self.names):
            missing, extra = sorted(set(self.names) - set(delta)), sorted(set(delta) - set(self.names))
            raise BadDataError(f"the update's tensors differ from the model's: missing {missing[:5]}, "
                               f"unknown {extra[:5]}")
        if not (math.isfinite(weight) and 0 < weight <= 1):
            raise QuantisationRangeError(f"the update's weight {weight} is outside (0, 1]")
        out = np.empty(self.length, np.uint32)
        signed = out.view(np.int32)  # |q| <= (2^31 - 1) / max_clients fits int32; its bits are q mod 2^32
        offset = 0
        for name, shape, scale, bound in zip(self.names, self.shapes, self.scales, self.bounds, strict=True):
            array = np.asarray(delta[name])
            if array.shape != shape:
                raise BadDataError(f"tensor {name} of the update has shape {array.shape}, the model's is {shape}")
            self._check_range(name, array, weight, bound)
            scaled = np.multiply(array.ravel(), weight * scale, dtype=np.float64)
            signed[offset:offset + array.size] = np.rint(scaled, out=scaled)
            offset += array.size
        signed[offset] = round(weight * self.weight_scale)
        return out

    def _check_range(self, name: str, array: NDArray[Any], weight: float, bound: float) -> None:
        """Refuse a non-finite value or one past the tensor's bound, naming the tensor, value, bound and setting.

        One pass over the tensor in its own dtype (max |w·d| is w·max |d|); the offending element is
        looked for only when there is one. Integers go through float64, where |min int64| exists.
        """
        if array.size == 0:
            return
        magnitude = np.abs(array if array.dtype.kind == "f" else array.astype(np.float64))
        if float(np.max(magnitude)) * weight <= bound:  # False for NaN too
            return
        value = array.astype(np.float64).ravel() * weight
        index = int(np.flatnonzero(~(np.abs(value) <= bound))[0])
        setting = ("the clip norm (privacy.clipNorm): clip the update to it before masking, or raise it"
                   if np.dtype(self.dtypes[self.names.index(name)]).kind == "f"
                   else "the integer range of integer tensors (integer_range): raise it")
        raise QuantisationRangeError(f"tensor {name}: weighted value {float(value[index])} at flat index {index} is "
                                     f"outside the quantisation range ±{bound}, set by {setting}")

    def dequantise(self, total: NDArray[np.uint32]) -> tuple[dict[str, NDArray[np.float64]], float]:
        """The sum of the weighted deltas per tensor (in the plan's shapes) and the sum of the weights."""
        if total.shape != (self.length,) or total.dtype != np.uint32:
            raise BadDataError(f"a sum of {total.shape} {total.dtype}, the plan's is ({self.length},) uint32")
        signed = np.ascontiguousarray(total).view(np.int32)
        sums: dict[str, NDArray[np.float64]] = {}
        offset = 0
        for name, shape, scale in zip(self.names, self.shapes, self.scales, strict=True):
            size = math.prod(shape)
            sums[name] = (signed[offset:offset + size].astype(np.float64) / scale).reshape(shape)
            offset += size
        return sums, float(signed[offset]) / self.weight_scale
