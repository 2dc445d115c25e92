"""The residual store: the one owner of error-feedback memory.

A residual is a 1-D tensor of the codec's residual dtype per key (a parameter's ordinal, a
list position, a name), local to its rank (docs/design.md, "Per-parameter decisions"). Block
tables hold residual addresses, so every replacement of a tensor bumps ``version``: plans
built against an older version are stale and must be rebuilt.
"""

from __future__ import annotations

import torch


class ResidualStore:
    """key -> residual, made (zero) on first use."""

    __slots__ = ("_tensors", "version")

    def __init__(self):
        self._tensors: dict = {}
        self.version = 0

    def get(self, key, numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The residual of ``key``: ``numel`` elements of ``dtype`` on ``device``. One carried in
        from elsewhere (a checkpoint, a pickle) is moved, cast and made contiguous here, once."""
        r = self._tensors.get(key)
        if r is None:
            r = self._tensors[key] = torch.zeros(numel, dtype=dtype, device=device)
            return r
        if r.numel() != numel:
            raise ValueError(f"gradcomp: the residual of {describe_key(key)} has {r.numel()} elements but {numel} are "
                             "expected here: this state was saved from another model or another node layout")
        if r.device != device or r.dtype != dtype or not r.is_contiguous() or r.dim() != 1:
            r = self._tensors[key] = r.detach().to(device, dtype).contiguous().reshape(-1)
            self.version += 1
        return r

    def put(self, key, tensor: torch.Tensor) -> None:
        """Stores ``tensor`` (1-D) as ``key``'s, in place of any other."""
        self._tensors[key] = tensor
        self.version += 1

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key) -> bool:
        return key in self._tensors

    def items(self):
        return self._tensors.items()

    def values(self):
        return self._tensors.values()

    def as_dict(self) -> dict:
        """The residuals themselves (not copies), in the order they were made."""
        return dict(self._tensors)

    def replace(self, residuals: dict) -> None:
        """Takes copies of ``residuals`` (key -> 1-D tensor) in place of the stored ones."""
        for k, r in residuals.items():
            if not isinstance(k, (int, str)) or isinstance(k, bool) or not isinstance(r, torch.Tensor) or r.dim() != 1:
                raise ValueError(f"gradcomp: residual entry {k!r} is not a key (int or str) and a 1-D tensor")
        self._tensors = {k: r.detach().clone() for k, r in residuals.items()}
        self.version += 1

    def clear(self) -> None:
        self._tensors.clear()
        self.version += 1


def describe_key(key) -> str:
    """A key in a message: a DDP parameter's ordinal, or an all_reduce position or name."""
    return f"parameter {key}" if isinstance(key, int) else f"tensor {key!r}"
