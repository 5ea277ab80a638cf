"""Fingerprints of base weights: which base an adapter was trained on.

Two views of one weight:
- `digest`: a hash of its bytes, exact (same weights, same dtype): `blake2b:<hex>` (BLAKE2b-256, faster than
  sha256 on CPUs without SHA instructions); adapters from lorakit 0.1 hold a bare sha256 hex digest, which is
  still accepted.
- `sketch`: a few signed projections of a fixed sample of its values, normalized by the sample's norm.
  The same weights in another dtype (bf16, fp16, int8) give nearly the same sketch; a different
  checkpoint gives values that differ by O(1).

A base layer's fingerprint is computed once and remembered (`base_fingerprint`), so that it still describes the
pristine weight after a merge changed it: unmerging restores the weight only up to float rounding.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from ..errors import LorakitError
from .base import dense_weight

SKETCH_SAMPLES = 4096
SKETCH_PROJECTIONS = 4
# Max |difference| of sketch values still accepted as "the same weights in another dtype".
# bf16 rounding moves a sketch value by ~0.002 (1 sigma), int8 row-wise quantization by ~0.01, NF4 by ~0.09 (its
# relative error; measured on SmolLM2-135M: at most 0.31 over its 840 values); other weights differ by O(1).
SKETCH_TOLERANCE = {"float": 0.03, "int8": 0.08, "4bit": 0.5}
FOUR_BIT = ("nf4", "fp4")


DIGEST = "blake2b"
"""The digest algorithm new adapters record."""


def weight_digest(weight: torch.Tensor, algorithm: str = DIGEST) -> str:
    """Hash (hex) of a tensor's raw bytes, with its dtype and shape; `blake2b:`-prefixed, bare for sha256."""
    t = weight.detach().contiguous().cpu()
    if algorithm == "blake2b":
        h = hashlib.blake2b(digest_size=32)
    elif algorithm == "sha256":
        h = hashlib.sha256()
    else:
        raise ValueError(f"unknown digest algorithm {algorithm!r}")
    h.update(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy; hashing releases the GIL
    return f"blake2b:{h.hexdigest()}" if algorithm == "blake2b" else h.hexdigest()


def digest_algorithm(digest: str) -> str:
    """The algorithm that made a recorded digest: blake2b (prefixed) or sha256 (bare, lorakit 0.1)."""
    return "blake2b" if digest.startswith("blake2b:") else "sha256"


def weight_sketch(weight: torch.Tensor) -> list[float]:
    """Signed projections of a fixed sample of `weight` (given as a dense (out, in) float tensor)."""
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    g = torch.Generator().manual_seed(20210617)
    index = torch.randint(0, n, (SKETCH_SAMPLES,), generator=g)  # with replacement: cheap for any size
    sample = flat[index.to(flat.device)].float().cpu()
    signs = torch.randint(0, 2, (SKETCH_PROJECTIONS, SKETCH_SAMPLES), generator=g).float() * 2 - 1
    norm = sample.norm()
    if norm == 0:
        return [0.0] * SKETCH_PROJECTIONS
    # Each value is ~N(0, 1) over random weights; dtype rounding moves it by ~relative error.
    return [round(float(v), 6) for v in (signs @ sample) / norm]


def combine_digests(digests: dict[str, str]) -> str:
    """One short fingerprint for a set of named weight digests (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}={digests[name]};".encode())
    return h.hexdigest()[:16]


def sketch_kind(*dtypes: str) -> str:
    """The tolerance class for comparing sketches of weights stored in these dtypes: the coarsest one."""
    if any(d in FOUR_BIT for d in dtypes):
        return "4bit"
    return "int8" if "int8" in dtypes else "float"


def sketches_match(a: list[float], b: list[float], kind: str = "float") -> bool:
    """Whether two sketches describe the same weights up to dtype rounding."""
    tol = SKETCH_TOLERANCE[kind]
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


_REMEMBERED: weakref.WeakKeyDictionary[nn.Module, tuple[str, list[float]]] = weakref.WeakKeyDictionary()


def base_fingerprint(base: nn.Module, refuse_new: bool = False) -> tuple[str, list[float]]:
    """(digest, sketch) of a base layer's weight, computed on the first call and remembered for the module.

    Args:
        base: the frozen layer (nn.Linear, Conv1D, Linear8bitLt).
        refuse_new: raise instead of computing (the weight has been changed by a merge since).
    """
    if base not in _REMEMBERED:
        if refuse_new:
            raise LorakitError("cannot fingerprint a merged layer; unmerge it first")
        _REMEMBERED[base] = (weight_digest(base.weight), weight_sketch(dense_weight(base)))
    return _REMEMBERED[base]


def remember(base: nn.Module, fingerprint: tuple[str, list[float]]) -> None:
    """Take a base layer's fingerprint as computed elsewhere (by the process that holds the whole weight, when
    this one holds a shard of it)."""
    _REMEMBERED[base] = (fingerprint[0], list(fingerprint[1]))


def forget(base: nn.Module) -> None:
    """Drop a base layer's remembered fingerprint (its weight now holds a merged update for good)."""
    _REMEMBERED.pop(base, None)


def base_digest(base: nn.Module, algorithm: str) -> str:
    """The digest of a base layer's current weight by `algorithm` (for adapters that record another one)."""
    return weight_digest(base.weight, algorithm)


def fingerprint_all(bases: Iterable[nn.Module]) -> None:
    """Fingerprint many base layers at once, one thread per torch thread (hashing releases the GIL)."""
    pending = [base for base in bases if base not in _REMEMBERED]
    workers = min(len(pending), torch.get_num_threads())
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(base_fingerprint, pending))  # list(): re-raises a worker's error here
