"""Fingerprints of base weights: which base an adapter was trained on.

Two views of one weight:
- `digest`: sha256 of its bytes, exact (same weights, same dtype).
- `sketch`: a few signed projections of a fixed sample of its values, normalized by the sample's norm.
  The same weights in another dtype (bf16, fp16, int8) give nearly the same sketch; a different
  checkpoint gives values that differ by O(1).
"""

from __future__ import annotations

import hashlib

import torch

SKETCH_SAMPLES = 4096
SKETCH_PROJECTIONS = 4
# Max |difference| of sketch values still accepted as "the same weights in another dtype".
# bf16 rounding moves a sketch value by ~0.002 (1 sigma), int8 row-wise quantization by ~0.01.
SKETCH_TOLERANCE = {"float": 0.03, "int8": 0.08}


def weight_digest(weight: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's raw bytes, with its dtype and shape."""
    t = weight.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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


def sketches_match(a: list[float], b: list[float], kind: str = "float") -> bool:
    """Whether two sketches describe the same weights up to dtype rounding."""
    tol = SKETCH_TOLERANCE[kind]
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))
