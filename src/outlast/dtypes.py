"""Mapping between torch dtypes and the dtype names of the safetensors format.

outlast stores tensors in safetensors files, so a dtype is only supported if
safetensors can name it; the names are also what the manifest records.
"""

from __future__ import annotations

import torch

from .errors import SerializationError

_TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _st in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        _TORCH_TO_ST[getattr(torch, _name)] = _st

_ST_TO_TORCH = {v: k for k, v in _TORCH_TO_ST.items()}


def to_safetensors(dtype: torch.dtype, *, name: str = "") -> str:
    """Return the safetensors name of ``dtype``; raise SerializationError naming ``name``."""
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        supported = ", ".join(str(d).replace("torch.", "") for d in _TORCH_TO_ST)
        raise SerializationError(
            f"tensor {name!r} has dtype {dtype}, which the safetensors format cannot hold; "
            f"convert it (e.g. .to(torch.float32)) before saving. Supported: {supported}"
        ) from None


def from_safetensors(name: str) -> torch.dtype:
    """Return the torch dtype for a safetensors dtype name; KeyError if unknown."""
    return _ST_TO_TORCH[name]


def known(name: str) -> bool:
    return name in _ST_TO_TORCH


_ITEMSIZE = {name: dt.itemsize for name, dt in _ST_TO_TORCH.items()}


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    return _ITEMSIZE[name]
