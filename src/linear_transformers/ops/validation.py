"""Input checks shared by the ops: every error names the function, the argument, what was expected
and what was seen, so a user never meets a shape error from deep inside a matmul."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of states and normalisers: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_tensor(fn: str, name: str, t: object, rank: int, layout: str) -> torch.Tensor:
    """`t` must be a floating tensor of `rank` dimensions; `layout` is the documented shape, e.g. '[B, T, H, D]'."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: {name} must have a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if t.dim() != rank:
        raise ValueError(f"{fn}: {name} must have {rank} dimensions {layout}, got shape {_shape(t)}")
    return t


def check_same_dtype_device(fn: str, **tensors: torch.Tensor) -> None:
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        t = tensors[name]
        if t.device != first.device:
            raise ValueError(
                f"{fn}: all inputs must be on one device; {names[0]} is on {first.device}, {name} on {t.device}"
            )
        if t.dtype != first.dtype:
            raise TypeError(f"{fn}: all inputs must share one dtype; {names[0]} is {first.dtype}, {name} is {t.dtype}")


def check_qkv(fn: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, same_length: bool) -> None:
    """q [B, T, H, Dk], k [B, S, H, Dk], v [B, S, H, Dv]; `same_length` additionally requires S == T."""
    check_tensor(fn, "q", q, 4, "[B, T, H, Dk]")
    check_tensor(fn, "k", k, 4, "[B, S, H, Dk]")
    check_tensor(fn, "v", v, 4, "[B, S, H, Dv]")
    check_same_dtype_device(fn, q=q, k=k, v=v)
    B, T, H, Dk = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != Dk:
        raise ValueError(f"{fn}: k must have shape [B, S, H, Dk] = [{B}, S, {H}, {Dk}] to match q, got {_shape(k)}")
    if v.shape[0] != B or v.shape[1] != k.shape[1] or v.shape[2] != H:
        raise ValueError(
            f"{fn}: v must have shape [B, S, H, Dv] = [{B}, {k.shape[1]}, {H}, Dv] to match q and k, got {_shape(v)}"
        )
    if same_length and k.shape[1] != T:
        raise ValueError(
            f"{fn}: causal attention needs as many keys as queries; q has T={T} ({_shape(q)}), "
            f"k has {k.shape[1]} ({_shape(k)})"
        )


def check_eps(fn: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{fn}: eps must be a float >= 0, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"{fn}: eps must be >= 0, got {eps}")
    return float(eps)


def check_chunk_size(fn: str, chunk_size: object) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"{fn}: chunk_size must be an int >= 1, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def check_key_padding_mask(fn: str, mask: object, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """key_padding_mask: bool [B, S], True where the key is padding (as in torch.nn.MultiheadAttention)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}: key_padding_mask must be a bool tensor [B, S], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{fn}: key_padding_mask must be a bool tensor [B, S] (True marks padding), got dtype {mask.dtype}"
        )
    if list(mask.shape) != [batch, length]:
        raise ValueError(f"{fn}: key_padding_mask must have shape [B, S] = [{batch}, {length}], got {_shape(mask)}")
    if mask.device != device:
        raise ValueError(f"{fn}: key_padding_mask is on {mask.device} but the inputs are on {device}")
    return mask
