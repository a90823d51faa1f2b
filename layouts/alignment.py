"""Row alignment of expert segments in the M-grouped contiguous layout (DeepGEMM semantics)."""

_DEFAULT_MK_ALIGNMENT = 128
_mk_alignment = _DEFAULT_MK_ALIGNMENT


def get_mk_alignment_for_contiguous_layout() -> int:
    """Rows each expert segment of a contiguous-layout A starts on (a multiple of the GEMM's block M)."""
    return _mk_alignment


def check_alignment(value: object, name: str = "alignment") -> int:
    """Raise TypeError/ValueError (naming ``name``) unless value is a positive multiple of 64 (the
    smallest block M); returns it."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: expected int, got {type(value).__name__}")
    if value <= 0 or value % 64 != 0:
        raise ValueError(f"{name}: expected a positive multiple of 64, got {value}")
    return value


def set_mk_alignment_for_contiguous_layout(value: int) -> None:
    """Set the segment alignment; must be a positive multiple of 64 (the smallest block M)."""
    global _mk_alignment
    _mk_alignment = check_alignment(value)


def get_theoretical_mk_alignment_for_contiguous_layout(expected_m: int | None = None) -> int:
    """Smallest alignment the kernels accept: 64 (one WGMMA M block), 128 for large expected M."""
    if expected_m is not None and expected_m <= 64:
        return 64
    return 128


def align(x: int, alignment: int) -> int:
    """Round x up to a multiple of alignment."""
    return (x + alignment - 1) // alignment * alignment
