"""Argument validation shared by the layout helpers; every error names the argument."""

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t: object, dtypes: tuple[torch.dtype, ...] | None = None,
                 ndims: tuple[int, ...] | None = None) -> None:
    """Raise TypeError/ValueError unless t is a tensor of one of dtypes with one of ndims dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        expected = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({expected}), got {t.dtype}")
    if ndims is not None and t.dim() not in ndims:
        expected = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{name}: expected a {expected}-D tensor, got shape {tuple(t.shape)}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Raise ValueError unless t has exactly the shape expected."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(t.shape)}")


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """Raise TypeError/ValueError unless value is an int (not bool) of at least minimum."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: expected int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_same_device(name: str, t: torch.Tensor, reference: torch.Tensor) -> None:
    """Raise ValueError unless t lives on the device of reference."""
    if t.device != reference.device:
        raise ValueError(f"{name}: expected device {reference.device}, got {t.device}")
