"""SM90 backward "dact" GEMM of the MoE layer: dO gathered in A's loads, the SwiGLU backward and the
router-weight gradient fused into the epilogue.

For sorted slot ``r`` of expert ``e`` (ragged row space: expert ``e`` owns rows ``[ends[e-1], ends[e])``)
and column ``c < I``, with ``g, u = h[r, c], h[r, I + c]`` (GEMM1's saved pre-activations):

    a = grad_out[row_index[r]] . w2[e, :, c]                              (FP32 accumulator)
    s = sigmoid(g)    dact = weight[r] * a
    dh[r, c] = dact * u * s * (1 + g * (1 - s))        dh[r, I + c] = dact * g * s          (bf16)
    partial[r, n_block] = sum over the tile's columns c of a * g * s * u                   (FP32)

so ``partial.sum(1)`` is the gradient of the slot's routing weight (``<dO[token], y>``). One value per
(row, N block), reduced in registers and across the quad of threads that shares the row (two
butterfly shuffles), stored once: no atomics, deterministic.

A ``Sm90GatheredSwigluGemm`` subclass (kernels/sm90/gathered_swiglu_gemm.py): the same gathering
producer warpgroup (grad_out's rows by cp.async, row indices clamped to ``[0, T)``; B by TMA), the
same ``PipelineTmaCpAsync`` ring and the grouped GEMM's consumer warpgroups and WGMMA mainloop. B is
w2 ``[E, H, I]``, i.e. N-major (I contiguous): one TMA box of tile_n x 64 per stage into an MN-major
stage layout, which WGMMA reads transposed. A box of the last N block past I is zero-filled by TMA,
so those accumulator columns are 0 and never stored. The epilogue, per consumer thread (FP32):
1. reads its elements' ``g`` and ``u`` from h (bf16, one 4-byte load per pair of adjacent columns,
   addresses clamped to the tile's valid rows and to ``c < I``, values 0 outside) and its two rows'
   weights;
2. accumulates the weight-gradient partial per row, writes ``dh``'s gate half in place of the
   accumulator and keeps the up half in a bf16 register fragment (rounded once, as it is stored);
3. quad-reduces and stores the partials (lane 0 of each quad), then stores the gate half and the
   up half of dh through the grouped GEMM's shared-memory epilogue (``store_tile``, predicated on
   rows and on ``c < I``).
A multicast cluster shares B along M (cluster_m = 2); A is per CTA (cluster_n must be 1).
"""

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32

from ..scheduler import WorkTile
from .gathered_swiglu_gemm import Sm90GatheredSwigluGemm
from .grouped_gemm import ROW_HALF, THREADS_PER_WARPGROUP, Sm90GroupedGemm

N_HALVES = 2  # the epilogue's column halves of a tile (one WGMMA N tile each)
QUAD = 4  # threads of a WGMMA accumulator quad: they hold the same two rows, every column between them
# Accumulator element i of a thread lies on row r0 + ROW_HALF * ((i // VALUES_PER_ROW_RUN) % 2).
VALUES_PER_ROW_RUN = 2
PAIR = 2  # accumulator values 2j, 2j + 1 of a thread: columns c, c + 1 of one row (c even)


class Sm90GatheredSwigluBackwardGemm(Sm90GatheredSwigluGemm):
    """Compile-time configuration of the backward dact GEMM (see the module docstring): ``inter`` = I
    (the GEMM's N), ``hidden`` = H (its K)."""

    def __init__(self, tile_m: int, tile_n: int, cluster_m: int, stages: int, panel: int, inter: int,
                 hidden: int):
        # The grouped GEMM's N = I, B N-major; GEMM1's (gate, up) N split does not apply here.
        Sm90GroupedGemm.__init__(self, "ragged", False, tile_m, tile_n, cluster_m, 1, stages, panel, inter, hidden,
                                 False, b_major="mn")
        # Two WGMMA N tiles of tile_n / 2 columns: the epilogue finishes one half's accumulators (dh's
        # gate and up columns) before the next, so few extra registers are live.
        self.half_n = tile_n // N_HALVES
        self.mma_tile_n = self.half_n
        self.init_gather(inter, 1, tile_n)

    @cute.jit
    def __call__(self, mGradOut: cute.Tensor, mW2: cute.Tensor, mDh: cute.Tensor, mPartial: cute.Tensor,
                 mH: cute.Tensor, mWeight: cute.Tensor, mRowIndex: cute.Tensor, mEnds: cute.Tensor,
                 max_clusters: Int32, stream):
        """grad_out ``[T, H]``, w2 ``[E, H, I]``, dh and h ``[S, 2I]`` (bf16 row-major), partial
        ``[S, ceil(I / tile_n)]`` and weight ``[S]`` FP32, row_index int32 ``[S]``, ends int32 ``[E]``."""
        self._setup(mDh.element_type)
        tile_m, tile_n, tile_k = self.tile_shape_mnk
        mB = cute.make_tensor(mW2.iterator, cute.select(mW2.layout, mode=[2, 1, 0]))  # (I, H, E), I contiguous
        tma_atom_b, tma_b = self._make_load_atom(mB, self.b_smem_layout, (tile_n, tile_k), self.num_mcast_b)
        self.shared_storage = self.shared_storage_type({})  # no scales
        self.backward_kernel(mGradOut, tma_atom_b, tma_b, mDh, mPartial, mH, mWeight, mRowIndex, mEnds,
                             mRowIndex.shape[0], mEnds.shape[0], mW2.shape[0], self.tiled_mma, self.cta_layout_mnk,
                             self.a_smem_layout, self.b_smem_layout, self.epi_smem_layout).launch(
            **self.launch_arguments(max_clusters, stream))

    @cute.kernel
    def backward_kernel(self, mGradOut: cute.Tensor, tma_atom_b: cute.CopyAtom, mB: cute.Tensor, mDh: cute.Tensor,
                        mPartial: cute.Tensor, mH: cute.Tensor, mWeight: cute.Tensor, mRowIndex: cute.Tensor,
                        mEnds: cute.Tensor, total_rows: Int32, num_groups: Int32, num_experts: Int32,
                        tiled_mma: cute.TiledMma, cta_layout_mnk: cute.Layout, a_smem_layout: cute.ComposedLayout,
                        b_smem_layout: cute.ComposedLayout, epi_smem_layout: cute.ComposedLayout):
        # The epilogue's inputs, the partials and the tiled MMA (whose accumulator layout the epilogue
        # reads) travel in C's slot of the shared consumer.
        self.gather_gemm(mGradOut, tma_atom_b, mB, mDh, (mH, mWeight, mPartial, tiled_mma), mRowIndex, mEnds,
                         total_rows, num_groups, num_experts, tiled_mma, cta_layout_mnk, a_smem_layout,
                         b_smem_layout, epi_smem_layout)

    @cute.jit
    def store_outputs(self, epilogue, accumulators: cute.Tensor, sD: cute.Tensor, mD: cute.Tensor, mC,
                      tile: WorkTile, epi_buffer: Int32) -> Int32:
        """The SwiGLU backward of one finished tile (see the module docstring), one N half at a time:
        ``mD`` is dh, ``mC`` holds (h, weight, partial, the tiled MMA)."""
        mH, mWeight, mPartial, tiled_mma = mC
        tile_m, tile_n, _ = self.tile_shape_mnk
        inter = self.inter
        consumer_tidx = cute.arch.thread_idx()[0] - THREADS_PER_WARPGROUP
        coords = tiled_mma.get_slice(consumer_tidx).partition_C(cute.make_identity_tensor((tile_m, tile_n)))
        r0 = coords[0][0]  # this thread's first row; its other row is r0 + ROW_HALF
        rows_valid = tile.rows_valid
        last_row = tile.row_start + rows_valid - 1  # rows_valid >= 1 here
        # Rows past the tile's valid rows weigh 0 (every load is clamped to a valid row and column).
        weights = [Float32(0.0), Float32(0.0)]
        for half in cutlass.range_constexpr(2):
            row = r0 + half * ROW_HALF
            weight = mWeight[cutlass.min(tile.row_start + row, last_row)]
            weights[half] = Float32(cutlass.select_(row < rows_valid, weight, Float32(0.0)))
        partials = [Float32(0.0), Float32(0.0)]
        part_values = cute.size(accumulators) // N_HALVES
        part_shape = (cute.shape(accumulators)[0], 1, 1)
        for part_index in cutlass.range_constexpr(N_HALVES):
            part = cute.make_tensor(accumulators.iterator + part_index * part_values, cute.make_layout(part_shape))
            up_grads = cute.make_rmem_tensor(part.layout, self.d_dtype)
            for pair in cutlass.range_constexpr(part_values // PAIR):
                # Values 2j and 2j + 1 are adjacent columns of one row: one 4-byte load of g's, one of u's.
                row, col = coords[part_index * part_values + PAIR * pair]
                half = (pair * PAIR // VALUES_PER_ROW_RUN) % 2
                column = tile.n_block * tile_n + col
                inside = (row < rows_valid) & (column < inter)
                h_row = cutlass.min(tile.row_start + row, last_row)
                h_col = cutlass.min(column, inter - PAIR)
                gates = self.load_pair(mH, h_row, h_col)
                ups = self.load_pair(mH, h_row, inter + h_col)
                for e in cutlass.range_constexpr(PAIR):
                    v = PAIR * pair + e
                    g = Float32(cutlass.select_(inside, Float32(gates[e]), Float32(0.0)))
                    u = Float32(cutlass.select_(inside, Float32(ups[e]), Float32(0.0)))
                    a = part[v]
                    sig = 1.0 / (1.0 + cute.math.exp(-g, fastmath=True))
                    silu = g * sig
                    partials[half] = partials[half] + a * silu * u
                    dact = weights[half] * a
                    up_grads[v] = self.d_dtype(dact * silu)
                    part[v] = dact * u * sig * (1.0 + g * (1.0 - sig))
            # This half's columns: N block 2 * n_block + part_index of tile_n / 2 columns.
            half_tile = WorkTile(tile.group, tile.row_start, rows_valid, tile.local_row,
                                 tile.n_block * N_HALVES + part_index, tile.b_shared)
            epi_buffer = self.store_tile(epilogue, part, sD, mD, None, half_tile, epi_buffer, self.half_n, inter, 0)
            part.store(up_grads.load().to(self.acc_dtype))
            epi_buffer = self.store_tile(epilogue, part, sD, mD, None, half_tile, epi_buffer, self.half_n, inter,
                                         inter)
        for half in cutlass.range_constexpr(2):
            for step in cutlass.range_constexpr(QUAD.bit_length() - 1):
                partials[half] = partials[half] + cute.arch.shuffle_sync_bfly(partials[half], offset=1 << step)
        if consumer_tidx % QUAD == 0:
            for half in cutlass.range_constexpr(2):
                row = r0 + half * ROW_HALF
                if row < rows_valid:
                    mPartial[(tile.row_start + row, tile.n_block)] = partials[half]
        return epi_buffer

    @cute.jit
    def load_pair(self, mH: cute.Tensor, row: Int32, col: Int32) -> cute.Tensor:
        """h[row, col : col + 2] (``col`` even) in registers: one 4-byte load."""
        pair = cute.make_rmem_tensor(cute.make_layout((1, PAIR)), mH.element_type)
        cute.autovec_copy(cute.local_tile(mH, (1, PAIR), (row, col // PAIR)), pair)
        return pair
