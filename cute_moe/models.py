"""MoE model presets and the expert GEMMs one rank runs for them under expert / tensor parallelism."""

import contextlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class MoeModel:
    """The MoE block of a model: hidden size, per-expert intermediate size, routed experts, top-k.

    ``origin``: where the model was described when errors about its values should say so, e.g.
    ``--shapes: m.json: entry 1`` (see model_errors); empty for presets.
    """

    name: str
    hidden: int
    moe_intermediate: int
    experts: int
    top_k: int
    origin: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")
        for name in ("hidden", "moe_intermediate", "experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{self.name}: {name}: expected a positive integer, got {value!r}")
        if self.top_k > self.experts:
            raise ValueError(f"{self.name}: top_k: expected <= experts ({self.experts}), got {self.top_k}")


PRESETS: dict[str, MoeModel] = {m.name: m for m in (
    MoeModel("DeepSeek-V3", 7168, 2048, 256, 8),
    MoeModel("DeepSeek-V4-Flash", 4096, 2048, 256, 6),
    MoeModel("DeepSeek-V4-Pro", 7168, 3072, 384, 6),
    MoeModel("Qwen3-30B-A3B", 2048, 768, 128, 8),
    MoeModel("Qwen3-235B-A22B", 4096, 1536, 128, 8),
    MoeModel("Mixtral-8x7B", 4096, 14336, 8, 2),
    MoeModel("gpt-oss-120b", 2880, 2880, 128, 4),
    MoeModel("Kimi-K2", 7168, 2048, 384, 8),
)}
# Presets whose expert weights ship in MXFP4 (E2M1 + UE8M0 per 32 K): gpt-oss publishes them so,
# DeepSeek-V4 runs FP8 activations x FP4 experts. Their GEMMs run with --dtype fp8xfp4 / bf16xfp4.
FP4_WEIGHT_MODELS = ("gpt-oss-120b", "DeepSeek-V4-Flash", "DeepSeek-V4-Pro")
# The expert-parallel degree each preset is served (benchmarked, tuned) at; the others keep every
# expert local.
SERVING_EP = {"DeepSeek-V3": 8, "Kimi-K2": 8, "DeepSeek-V4-Flash": 8, "DeepSeek-V4-Pro": 8}


def get_preset(name: str) -> MoeModel:
    """The preset called ``name`` (case-insensitive)."""
    for model in PRESETS.values():
        if model.name.lower() == name.lower():
            return model
    raise ValueError(f"--model: unknown model {name!r}; presets: {', '.join(PRESETS)} "
                     f"(or describe it in a --shapes JSON file)")


def load_shapes(path: str) -> list[MoeModel]:
    """Models from a JSON file: one object or a list of objects with the fields of MoeModel."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--shapes: cannot read {path}: {e}") from e
    items = data if isinstance(data, list) else [data]
    names = [f.name for f in fields(MoeModel) if f.name != "origin"]
    models = []
    for i, item in enumerate(items):
        origin = f"--shapes: {path}: entry {i}"
        if not isinstance(item, dict) or sorted(item) != sorted(names):
            raise ValueError(f"{origin}: expected an object with exactly the keys {names}, got {item!r}")
        try:
            models.append(MoeModel(**item, origin=origin))
        except ValueError as e:
            raise ValueError(f"{origin}: {e}") from e
    if not models:
        raise ValueError(f"--shapes: {path}: no models in the file")
    return models


@contextlib.contextmanager
def model_errors(model: MoeModel) -> Iterator[None]:
    """Inside the block, a ValueError about the model's own values (one naming no --option) starts
    with the model's origin, e.g. ``--shapes: m.json: entry 1: groups: ...``."""
    try:
        yield
    except ValueError as e:
        if not model.origin or str(e).startswith("--"):
            raise
        raise ValueError(f"{model.origin}: {e}") from None


@dataclass(frozen=True)
class ExpertGemm:
    """One expert GEMM of one rank: D[rows, n] = A[rows, k] . B[g, n, k]^T over ``num_groups`` experts."""

    model: str
    name: str
    n: int
    k: int
    num_groups: int


def expert_gemms(model: MoeModel, ep: int = 1, tp: int = 1) -> tuple[ExpertGemm, ExpertGemm]:
    """GEMM1 (gate+up fused: N = 2 * moe_intermediate / tp, K = hidden) and GEMM2 (down: N = hidden,
    K = moe_intermediate / tp), each over experts / ep local experts.

    The model's own sizes are checked first, so --ep / --tp are blamed only for what they split."""
    for name in ("hidden", "moe_intermediate"):
        if getattr(model, name) % 8 != 0:
            raise ValueError(f"{model.name}: {name}: expected a multiple of 8, got {getattr(model, name)}")
    if ep < 1 or model.experts % ep != 0:
        raise ValueError(f"--ep: expected a divisor of {model.name}'s {model.experts} experts, got {ep}")
    if tp < 1 or model.moe_intermediate % tp != 0 or (model.moe_intermediate // tp) % 8 != 0:
        raise ValueError(f"--tp: expected a divisor of {model.name}'s moe_intermediate {model.moe_intermediate} "
                         f"leaving a multiple of 8 per rank, got {tp}")
    groups = model.experts // ep
    inter = model.moe_intermediate // tp
    return (ExpertGemm(model.name, "gate_up", 2 * inter, model.hidden, groups),
            ExpertGemm(model.name, "down", model.hidden, inter, groups))


def expected_rows(model: MoeModel, tokens: int, ep: int = 1) -> int:
    """Average rows one local expert receives when each rank feeds ``tokens`` tokens to the MoE layer.

    With expert parallelism the ep ranks' tokens * top_k routes spread over all experts, so each of
    the experts / ep local experts gets tokens * ep * top_k / experts = tokens * top_k / (experts / ep)
    rows on average (rounded up). Under tensor parallelism alone (ep = 1) every rank sees every token
    and every expert. This is the ``expected_m`` hint of the masked (decode) kernels.
    """
    if tokens < 0:
        raise ValueError(f"tokens: expected >= 0, got {tokens}")
    return math.ceil(tokens * model.top_k * ep / model.experts)
