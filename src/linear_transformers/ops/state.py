"""Recurrent states: `LinearState` for linear attention (O(1) in sequence length) and `KVCache` for
softmax attention (grows with the sequence)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .validation import accumulation_dtype, check_tensor


@dataclass
class LinearState:
    """State of causal linear attention after `n_tokens` tokens (paper Eq. 18-19).

    S: [B, H, Dk, Dv], the running sum of phi(k_j) v_j^T.
    z: [B, H, Dk], the running sum of phi(k_j), the normaliser's state.
    Both are float32 (float64 for float64 inputs) whatever the input dtype.
    """

    S: torch.Tensor
    z: torch.Tensor
    n_tokens: int = 0

    def __post_init__(self) -> None:
        self.check()

    def check(self, fn: str = "LinearState") -> None:
        """S and z agree (shapes, dtype, device): checked at construction and again by every op
        that reads the state, since its tensors can be replaced after it was made."""
        check_tensor(fn, "S", self.S, 4, "[B, H, Dk, Dv]")
        check_tensor(fn, "z", self.z, 3, "[B, H, Dk]")
        if list(self.z.shape) != list(self.S.shape[:3]):
            raise ValueError(
                f"{fn}: z must have shape [B, H, Dk] = {list(self.S.shape[:3])} to match S {list(self.S.shape)}, "
                f"got {list(self.z.shape)}"
            )
        if self.S.dtype != self.z.dtype or self.S.device != self.z.device:
            raise TypeError(
                f"{fn}: S and z must share dtype and device, got S {self.S.dtype} on {self.S.device}, "
                f"z {self.z.dtype} on {self.z.device}"
            )
        if self.S.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{fn}: S and z accumulate in float32 or float64, got {self.S.dtype}")

    @classmethod
    def zeros(
        cls,
        batch: int,
        heads: int,
        d_keys: int,
        d_values: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> LinearState:
        """An empty state. `dtype` is the *input* dtype; the state itself is float32 or float64."""
        acc = accumulation_dtype(dtype)
        return cls(
            S=torch.zeros(batch, heads, d_keys, d_values, dtype=acc, device=device),
            z=torch.zeros(batch, heads, d_keys, dtype=acc, device=device),
            n_tokens=0,
        )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Dk, Dv)."""
        return tuple(self.S.shape)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.S.device

    @property
    def dtype(self) -> torch.dtype:
        return self.S.dtype

    def detach(self) -> LinearState:
        """The same state cut from the autograd graph (truncated back-propagation through time)."""
        return LinearState(self.S.detach(), self.z.detach(), self.n_tokens)

    def clone(self) -> LinearState:
        return LinearState(self.S.clone(), self.z.clone(), self.n_tokens)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LinearState:
        """Move to `device`; `dtype` must be float32 or float64 (the state never holds half precision)."""
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise TypeError(f"LinearState.to: the state accumulates in float32 or float64, got dtype={dtype}")
        return LinearState(self.S.to(device=device, dtype=dtype), self.z.to(device=device, dtype=dtype), self.n_tokens)

    def index_select(self, batch_index: torch.Tensor) -> LinearState:
        """Keep or reorder batch rows (beam search, dropping finished sequences)."""
        return LinearState(self.S.index_select(0, batch_index), self.z.index_select(0, batch_index), self.n_tokens)


class KVCache:
    """Preallocated key/value cache for softmax attention's recurrent step ("stateful softmax").

    Holds the keys and values of `length` tokens. Storage is [B, H, capacity, D] so each head's
    prefix is contiguous for the attention kernel; it doubles when full, so appending N tokens
    costs O(N) amortised copies. Keys and values keep the input dtype.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int = 0, padding: torch.Tensor | None = None) -> None:
        fn = "KVCache"
        check_tensor(fn, "k", k, 4, "[B, H, capacity, Dk]")
        check_tensor(fn, "v", v, 4, "[B, H, capacity, Dv]")
        if k.shape[:3] != v.shape[:3] or k.dtype != v.dtype or k.device != v.device:
            raise ValueError(
                f"{fn}: k and v storage must agree on [B, H, capacity], dtype and device; got k "
                f"{list(k.shape)} {k.dtype} {k.device}, v {list(v.shape)} {v.dtype} {v.device}"
            )
        if not 0 <= length <= k.shape[2]:
            raise ValueError(f"{fn}: length must be in [0, capacity={k.shape[2]}], got {length}")
        if padding is not None and (padding.shape != k.shape[:1] + k.shape[2:3] or padding.dtype != torch.bool):
            raise ValueError(
                f"{fn}: padding must be bool [B, capacity] = {list(k.shape[:1] + k.shape[2:3])}, "
                f"got {padding.dtype} {list(padding.shape)}"
            )
        self._k = k
        self._v = v
        self._pad = padding  # True at cached tokens that are padding (None: none is)
        self.length = length

    @classmethod
    def empty(
        cls,
        batch: int,
        heads: int,
        d_keys: int,
        d_values: int,
        *,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> KVCache:
        if capacity < 1:
            raise ValueError(f"KVCache.empty: capacity must be >= 1, got {capacity}")
        k = torch.zeros(batch, heads, capacity, d_keys, dtype=dtype, device=device)
        v = torch.zeros(batch, heads, capacity, d_values, dtype=dtype, device=device)
        return cls(k, v, 0)

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    @property
    def batch(self) -> int:
        return self._k.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.length

    @property
    def dtype(self) -> torch.dtype:
        return self._k.dtype

    @property
    def device(self) -> torch.device:
        return self._k.device

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        B, H, _, Dk = self._k.shape
        k = self._k.new_zeros(B, H, capacity, Dk)
        v = self._v.new_zeros(B, H, capacity, self._v.shape[3])
        k[:, :, : self.length] = self._k[:, :, : self.length]
        v[:, :, : self.length] = self._v[:, :, : self.length]
        if self._pad is not None:
            pad = self._pad.new_zeros(B, capacity)
            pad[:, : self.length] = self._pad[:, : self.length]
            self._pad = pad
        self._k, self._v = k, v

    def append(self, k: torch.Tensor, v: torch.Tensor, padding: torch.Tensor | None = None) -> None:
        """Append keys [B, T, H, Dk] and values [B, T, H, Dv] (the public layout); padding: bool [B, T],
        True at tokens that are padding (no query attends to them)."""
        B, H, _, Dk = self._k.shape
        if k.dim() != 4 or k.shape[0] != B or k.shape[2] != H or k.shape[3] != Dk:
            raise ValueError(
                f"KVCache.append: k must have shape [B, T, H, Dk] = [{B}, T, {H}, {Dk}], got {list(k.shape)}"
            )
        Dv = self._v.shape[3]
        if v.dim() != 4 or list(v.shape) != [B, k.shape[1], H, Dv]:
            raise ValueError(
                f"KVCache.append: v must have shape [B, T, H, Dv] = [{B}, {k.shape[1]}, {H}, {Dv}], got {list(v.shape)}"
            )
        T = k.shape[1]
        if padding is not None and (padding.shape != (B, T) or padding.dtype != torch.bool):
            raise ValueError(
                f"KVCache.append: padding must be bool [B, T] = [{B}, {T}], got {padding.dtype} {list(padding.shape)}"
            )
        self._reserve(self.length + T)
        self._k[:, :, self.length : self.length + T] = k.transpose(1, 2)
        self._v[:, :, self.length : self.length + T] = v.transpose(1, 2)
        if padding is not None and self._pad is None and bool(padding.any()):
            self._pad = torch.zeros(B, self.capacity, dtype=torch.bool, device=self._k.device)
        if self._pad is not None:
            self._pad[:, self.length : self.length + T] = False if padding is None else padding
        self.length += T

    def padding(self) -> torch.Tensor | None:
        """bool [B, length], True at cached tokens that are padding; None when none is."""
        return None if self._pad is None else self._pad[:, : self.length]

    def keys(self) -> torch.Tensor:
        """Cached keys as a [B, H, length, Dk] view (head-major, the layout attention kernels take)."""
        return self._k[:, :, : self.length]

    def values(self) -> torch.Tensor:
        """Cached values as a [B, H, length, Dv] view."""
        return self._v[:, :, : self.length]

    def detach(self) -> KVCache:
        return KVCache(self._k.detach(), self._v.detach(), self.length, self._pad)

    def clone(self) -> KVCache:
        pad = None if self._pad is None else self._pad.clone()
        return KVCache(self._k.clone(), self._v.clone(), self.length, pad)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
        pad = None if self._pad is None else self._pad.to(device=device)
        return KVCache(self._k.to(device=device, dtype=dtype), self._v.to(device=device, dtype=dtype), self.length, pad)

    def index_select(self, batch_index: torch.Tensor) -> KVCache:
        pad = None if self._pad is None else self._pad.index_select(0, batch_index)
        return KVCache(self._k.index_select(0, batch_index), self._v.index_select(0, batch_index), self.length, pad)

    def __repr__(self) -> str:
        B, H, cap, Dk = self._k.shape
        return (
            f"KVCache(batch={B}, heads={H}, d_keys={Dk}, d_values={self._v.shape[3]}, length={self.length}, "
            f"capacity={cap}, dtype={self.dtype})"
        )
