"""What a layer's forward keeps for its backward, and its peak memory over forward + backward.

- ``saved_tensor_bytes``: the bytes of the distinct storages autograd saves while a forward records
  (``torch.autograd.graph.saved_tensors_hooks`` sees every saved tensor, ``ctx.save_for_backward`` of
  custom autograd functions included). A view counts as its whole storage (that is what stays alive),
  a storage saved twice counts once, and the storages of ``exclude`` (the layer's inputs and weights,
  which the caller holds anyway) do not count.
- ``cuda_memory_use``: on the GPU, the bytes allocated after the forward (its output and what it
  saved) and the peak bytes allocated during forward + backward, both above what was allocated
  before the forward (the weights, inputs and anything else already held).
"""

from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    """Identifies a tensor's storage: (device, address of its first byte)."""
    return str(t.device), t.untyped_storage().data_ptr()


def saved_tensor_bytes(forward: Callable[[], T], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, T]:
    """(bytes autograd saved for backward while ``forward()`` ran, its result). The result keeps the
    saved tensors alive, so no storage counted here was freed and reused by another saved tensor."""
    excluded = {storage_key(t) for t in exclude}
    sizes: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in excluded:
            sizes[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return sum(sizes.values()), result


@dataclass
class MemoryUse:
    """Bytes above the memory allocated before the forward: after it (``held``: its output and what
    autograd saved) and at the peak of forward + backward (``peak``: gradients included)."""

    held: int
    peak: int


def cuda_memory_use(forward: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], object]) -> MemoryUse:
    """Run ``backward(forward())`` once on the current GPU and measure it (see ``MemoryUse``); the
    gradients ``backward`` returns are freed before this returns."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = forward()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    grads = backward(out)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out, grads
    return MemoryUse(held, peak)
