"""Argument checks run before every launch; each error names the argument, expected vs actual."""

import torch


def check_tensor(name: str, t, dtypes: tuple, ndim: int) -> None:
    """Type, dtype and rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        expected = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {expected}, got {str(t.dtype).replace('torch.', '')}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")


def check_placement(**tensors: torch.Tensor) -> None:
    """All on one CUDA device with aligned bases (checked after shapes and strides)."""
    names = list(tensors)
    first = tensors[names[0]].device
    for name, t in tensors.items():
        if t is None:
            continue
        if not t.is_cuda:
            raise ValueError(f"{name}: expected a CUDA tensor, got device {t.device}")
        if t.device != first:
            raise ValueError(f"{name}: expected device {first} (same as {names[0]}), got {t.device}")
        # Operands move through TMA and 16-byte vectors; int32 tables are read element by element.
        alignment = 4 if t.dtype == torch.int32 else 16
        if t.data_ptr() % alignment != 0:
            raise ValueError(f"{name}: expected a {alignment}-byte aligned data pointer, "
                             f"got address {t.data_ptr():#x}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    """Row-major and dense (the kernels read rows with TMA and write them with 16-byte stores)."""
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous row-major tensor, got shape {tuple(t.shape)} "
                         f"with strides {t.stride()}")


def check_shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(t.shape)}")


def check_multiple(name: str, value: int, multiple: int, what: str) -> None:
    if value % multiple != 0:
        raise ValueError(f"{name}: expected {what} to be a multiple of {multiple}, got {value}")


def check_int_arg(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: expected int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value}")
