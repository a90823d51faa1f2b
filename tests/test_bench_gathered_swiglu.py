"""The fused-GEMM1 benchmark on the CPU: its torch baseline's routed rows come in the order of ours
(so the calc_diff it reports compares like rows); its command-line errors, and the backward dact
benchmark's, are one line."""

import pytest
import torch

from cute_moe.moe_layer import route as sort_slots
from cute_moe.tools import bench_gathered_swiglu, bench_gathered_swiglu_backward
from cute_moe.tools.bench_moe_layer import route
from cute_moe.tools.grouped_mm_moe import BF16_GROUP_ALIGNMENT, permute_by_expert


def test_padded_torch_rows_follow_our_slot_order():
    tokens, experts, top_k = 300, 9, 4
    topk_idx = route(tokens, experts, top_k, torch.Generator().manual_seed(0))[0]
    topk_idx[::7, 1] = -1  # dropped slots
    _, token, _, ends, _ = sort_slots(topk_idx, experts)
    perm = permute_by_expert(topk_idx, experts, BF16_GROUP_ALIGNMENT)
    routed = int(ends[-1])
    assert torch.equal(perm.token[perm.token < tokens], token[:routed])


@pytest.mark.parametrize("bench", [bench_gathered_swiglu, bench_gathered_swiglu_backward])
def test_unknown_shape_is_a_one_line_error(capsys, bench):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--shapes", "nope", "--out", "/tmp/unused"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--shapes: unknown shape 'nope'" in err and "\n" not in err
