"""The policy's weights as an engine loads them: Hugging Face names, the engine's dtype, packed into flat buckets.

A weight sync moves every parameter the inference engine stores once per iteration. Packing them into a few flat
byte buffers of about ``bucket_bytes`` each (the way production RLHF systems ship weights) makes each bucket one
object-store object or one broadcast, in the engine's dtype (bfloat16 halves the bytes of float32), and lets the
engine load bucket by bucket, so neither side ever holds a second full copy. A bucket is raw bytes (uint8): NumPy
has no bfloat16, and a broadcast of bytes works for every dtype; :func:`unpack_bucket` reinterprets them.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Iterable, Iterator, Sequence

import torch

ENGINE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # rollout.dtype


@dataclass(frozen=True)
class BucketLayout:
    """What one bucket holds: parameter names and shapes, in order, packed back to back in ``dtype``."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str  # a key of ENGINE_DTYPES

    @property
    def numel(self) -> int:
        return sum(prod(s) for s in self.shapes)

    @property
    def nbytes(self) -> int:
        return self.numel * ENGINE_DTYPES[self.dtype].itemsize


def plan_buckets(shapes: Iterable[tuple[str, Sequence[int]]], dtype: str, bucket_bytes: int) -> list[BucketLayout]:
    """Consecutive parameters grouped into buckets of at most ``bucket_bytes`` (a larger parameter gets its own)."""
    itemsize = ENGINE_DTYPES[dtype].itemsize
    buckets: list[BucketLayout] = []
    names: list[str] = []
    dims: list[tuple[int, ...]] = []
    size = 0
    for name, shape in shapes:
        nbytes = prod(shape) * itemsize
        if names and size + nbytes > bucket_bytes:
            buckets.append(BucketLayout(tuple(names), tuple(dims), dtype))
            names, dims, size = [], [], 0
        names.append(name)
        dims.append(tuple(int(d) for d in shape))
        size += nbytes
    if names:
        buckets.append(BucketLayout(tuple(names), tuple(dims), dtype))
    return buckets


def pack_bucket(layout: BucketLayout, tensors: dict[str, torch.Tensor], device: str = "cpu") -> torch.Tensor:
    """The bucket's bytes, (nbytes,) uint8 on ``device``: each tensor converted to the engine dtype as it is copied
    in (``copy_`` converts in place: no full-size temporary per tensor)."""
    flat = torch.empty(layout.numel, dtype=ENGINE_DTYPES[layout.dtype], device=device)
    offset = 0
    for name in layout.names:
        t = tensors[name].detach()
        flat[offset : offset + t.numel()].copy_(t.reshape(-1))
        offset += t.numel()
    return flat.view(torch.uint8)


def unpack_bucket(layout: BucketLayout, raw: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of a bucket's bytes, as views of ``raw`` (no copy), for ``reload_weights``."""
    flat = raw.view(ENGINE_DTYPES[layout.dtype])
    offset = 0
    for name, shape in zip(layout.names, layout.shapes):
        n = prod(shape)
        yield name, flat[offset : offset + n].view(shape)
        offset += n
