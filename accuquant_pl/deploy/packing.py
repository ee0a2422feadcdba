"""Integer weight storage: 2..4-bit codes packed two per byte, 5..8-bit codes one per (u)int8.

Stored values are the integer levels ``q`` of the quantizer (``w_hat = (q - zero_point) * scale``):

* ``bits <= 4``: the unsigned code ``u = q - quant_min`` (0..15) is packed two per byte, element ``2i`` in
  the low nibble of byte ``i`` and element ``2i + 1`` in the high nibble. An odd element count leaves the last
  high nibble 0, and unpacking checks that it is (a nonzero pad means the bytes were not written by us).
* ``bits >= 5``: ``q`` itself as ``int8`` (symmetric range) or ``uint8`` (asymmetric range), one per byte.

Storage is flat; the weight shape lives in the quantization map, so any element count (odd channel counts,
odd kernel sizes) packs without padding rows.
"""

from __future__ import annotations

import torch

from accuquant_pl.quant.affine import quant_range

PACKED_MAX_BITS = 4
"""Bit widths up to this are packed two codes per byte."""


def storage_kind(bits: int, symmetric: bool) -> str:
    """Name of the storage format of ``bits``-bit weights: ``uint4x2``, ``int8`` or ``uint8``."""
    quant_range(bits, symmetric)  # validates bits
    if bits <= PACKED_MAX_BITS:
        return "uint4x2"
    return "int8" if symmetric else "uint8"


def storage_dtype(bits: int, symmetric: bool) -> torch.dtype:
    """dtype of the stored tensor (packed nibbles are ``uint8`` too)."""
    return torch.int8 if storage_kind(bits, symmetric) == "int8" else torch.uint8


def stored_numel(numel: int, bits: int) -> int:
    """Number of stored elements (bytes) for ``numel`` codes of ``bits`` bits."""
    return (numel + 1) // 2 if bits <= PACKED_MAX_BITS else numel


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes (any shape, values 0..15) two per byte into a flat ``uint8`` tensor."""
    flat = codes.reshape(-1).to(torch.int16)
    if flat.numel() and (flat.min() < 0 or flat.max() > 15):
        raise ValueError(f"4-bit codes must lie in [0, 15], got [{int(flat.min())}, {int(flat.max())}]")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])  # pad nibble: 0, checked by unpack_int4
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``numel`` codes (``uint8``, flat) from a flat packed ``uint8`` tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed 4-bit storage must be a flat uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"packed 4-bit storage has {packed.numel()} bytes, {numel} codes need {(numel + 1) // 2}")
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    if codes.numel() > numel:
        if codes[numel:].any():
            raise ValueError("packed 4-bit storage: the pad nibble after the last code is not 0")
        codes = codes[:numel]
    return codes


def pack_weight(q: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Storage (flat) of the integer levels ``q`` of a ``bits``-bit quantizer; raises if ``q`` is out of range."""
    qmin, qmax = quant_range(bits, symmetric)
    q = q.detach().reshape(-1).to(torch.int32)
    if q.numel() and (q.min() < qmin or q.max() > qmax):
        raise ValueError(f"{bits}-bit levels must lie in [{qmin}, {qmax}], got [{int(q.min())}, {int(q.max())}]")
    if bits <= PACKED_MAX_BITS:
        return pack_int4(q - qmin)
    return q.to(storage_dtype(bits, symmetric))


def unpack_weight(stored: torch.Tensor, bits: int, symmetric: bool, shape: tuple[int, ...] | torch.Size,
                  dtype: torch.dtype = torch.int16, check: bool = True) -> torch.Tensor:
    """Integer levels ``q`` (``dtype``, ``shape``) from :func:`pack_weight` storage.

    Sizes and dtypes are always checked; ``check`` also checks every level against the range (an O(n) pass
    that the loader does once, so the per-forward dequantization can skip it).
    """
    qmin, qmax = quant_range(bits, symmetric)
    numel = 1
    for d in shape:
        numel *= int(d)
    if bits <= PACKED_MAX_BITS:
        q = unpack_int4(stored, numel).to(dtype) + qmin
    else:
        expected = storage_dtype(bits, symmetric)
        if stored.dtype != expected or stored.numel() != numel:
            raise ValueError(
                f"{bits}-bit storage must be {numel} {expected} values, got {stored.numel()} {stored.dtype}")
        q = stored.reshape(-1).to(dtype)
    if check and q.numel() and (q.min() < qmin or q.max() > qmax):
        raise ValueError(f"{bits}-bit storage holds levels in [{int(q.min())}, {int(q.max())}], "
                         f"outside [{qmin}, {qmax}]")
    return q.reshape(shape)
