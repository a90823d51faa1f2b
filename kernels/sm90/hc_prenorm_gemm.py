"""SM90 hyper-connection prenorm GEMM: D[s] = A . B^T and S[s] = rowsum(A^2) over split s of K.

A is BF16 ``[M, K]`` (the flattened n-stream residual, n*C wide), B is the FP32 projection ``[N, K]``,
turned by a first small kernel (``split_kernel``, same launch call) into BF16 ``[2N, K]``: rows
``0..N-1`` the high part ``hi = bf16(b)`` and rows ``N..2N-1`` the low part ``lo = bf16(b - hi)``
(b = hi + lo to ~16 mantissa bits). One BF16 WGMMA of
width 2N multiplies A by both halves; the epilogue adds column ``c`` and column ``N + c``. Products of
BF16 values are exact in the FP32 accumulator, so the result is as accurate as an FP32 GEMM with b
rounded to 16 bits (better than TF32, which keeps 10). The square-sum is taken from the same A tiles
in shared memory, so A is read from HBM once.

Grid ``(ceil(M / tile_m), num_splits)``: CTA ``(m, s)`` covers rows ``[m*tile_m, (m+1)*tile_m)`` and
the k-tiles ``[s*kt/S, (s+1)*kt/S)`` (kt = K / 64), and writes ``D[s]`` / ``S[s]`` for its rows.
Roles (``128 * (1 + tile_m // 64)`` threads):
- warp 0: TMA producer, loads the k-tiles of A (tile_m x 64) and B (2N x 64) into a ``stages``-deep
  ring (``PipelineTmaAsync``: full barrier = transaction bytes, empty barrier = consumer release).
  Rows past M are zero-filled by TMA.
- ``tile_m // 64`` consumer warpgroups: per k-tile, issue the WGMMAs (64 x 2N x 64 each), square-add
  their share of the A tile from shared memory while the WGMMAs run (thread t: row t // 2, 32 of the
  64 columns as four 16-byte loads), wait for the WGMMAs, release the stage and add the k-tile's
  WGMMA result (started from zero) into the FP32 accumulator: the tensor cores truncate when they
  accumulate, so the truncated chain stays 64 long (docs/hc.md). Epilogue: D rows < M from registers
  (hi + lo), S from the two threads of a row (one shuffle).
"""

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float32, Int32
from cutlass.memory import SmemAllocator
from cutlass.pipeline import pipeline_init_arrive, pipeline_init_wait
from cutlass.tensor_utils import LayoutEnum

SMEM_CAPACITY = 232448  # bytes of dynamic shared memory per CTA on sm_90
SMEM_RESERVED_BYTES = 1024  # mbarriers and alignment padding
TILE_K = 64  # BF16 values of one 128-byte swizzle row
THREADS_PER_WARPGROUP = 128
WARPS_PER_WARPGROUP = 4
ROWS_PER_CONSUMER_WARPGROUP = 64  # one WGMMA M extent
THREADS_PER_ROW = 2  # consumer threads square-summing one row of an A tile
COLS_PER_THREAD = TILE_K // THREADS_PER_ROW
SQUARE_VEC = 8  # bf16 values per 16-byte shared-memory load (the 128-byte swizzle keeps them contiguous)
PRODUCER_REGS = 40
CONSUMER_REGS = 232
MAX_STAGES = 8
# Accumulator fragment of one thread: element 4j + r sits on column block j (8 columns wide).
ACC_ELEMS_PER_COL_BLOCK = 4
COL_BLOCK = 8
SPLIT_THREADS = 256  # threads per CTA of the hi/lo split of B


class HcPrenormGemm:
    """Compile-time configuration: N (output columns), K, rows per CTA and pipeline depth."""

    def __init__(self, n: int, k: int, tile_m: int = 128, stages: int = 0):
        if n % COL_BLOCK != 0 or not 0 < 2 * n <= 256:
            raise ValueError(f"n: expected a multiple of {COL_BLOCK} in [8, 128], got {n}")
        if k % TILE_K != 0 or k <= 0:
            raise ValueError(f"k: expected a positive multiple of {TILE_K}, got {k}")
        if tile_m % ROWS_PER_CONSUMER_WARPGROUP != 0 or not 64 <= tile_m <= 256:
            raise ValueError(f"tile_m: expected 64, 128, 192 or 256, got {tile_m}")
        self.n = n
        self.k = k
        self.tile_m = tile_m
        self.tile_n = 2 * n  # hi and lo halves of B
        self.k_tiles = k // TILE_K
        self.num_consumer_wgs = tile_m // ROWS_PER_CONSUMER_WARPGROUP
        self.num_consumer_threads = THREADS_PER_WARPGROUP * self.num_consumer_wgs
        self.threads_per_cta = THREADS_PER_WARPGROUP * (1 + self.num_consumer_wgs)
        stage_bytes = (tile_m + self.tile_n) * TILE_K * 2
        fit = (SMEM_CAPACITY - SMEM_RESERVED_BYTES) // stage_bytes
        self.stages = min(fit, MAX_STAGES) if stages == 0 else min(stages, fit)
        if self.stages < 2:
            raise ValueError(f"stages: tile_m {tile_m} leaves room for {fit} stages, need 2")

    def _setup(self):
        self.ab_dtype = cutlass.BFloat16
        k_major = cute.nvgpu.OperandMajorMode.K
        self.tiled_mma = sm90_utils.make_trivial_tiled_mma(
            self.ab_dtype, self.ab_dtype, k_major, k_major, Float32,
            (self.num_consumer_wgs, 1, 1), tiler_mn=(ROWS_PER_CONSUMER_WARPGROUP, self.tile_n))
        atom = cute.nvgpu.warpgroup.make_smem_layout_atom(
            sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, self.ab_dtype, TILE_K), self.ab_dtype)
        self.a_smem_layout = cute.tile_to_shape(atom, (self.tile_m, TILE_K, self.stages), order=(0, 1, 2))
        self.b_smem_layout = cute.tile_to_shape(atom, (self.tile_n, TILE_K, self.stages), order=(0, 1, 2))

    @cute.jit
    def __call__(self, mA: cute.Tensor, mB32: cute.Tensor, mB: cute.Tensor, mD: cute.Tensor, mS: cute.Tensor,
                 stream):
        """A ``[M, K]`` BF16, B32 ``[N, K]`` FP32, B ``[2N, K]`` BF16 workspace (filled here with the hi
        rows then the lo rows of B32), D ``[S, M, N]`` FP32, S ``[S, M]`` FP32; the split count is D's
        first extent (the host checks 1 <= S <= K / 64). Two launches on ``stream``: split, GEMM."""
        self._setup()
        split_blocks = (self.n * self.k + SPLIT_THREADS - 1) // SPLIT_THREADS
        self.split_kernel(mB32, mB).launch(grid=(split_blocks, 1, 1), block=[SPLIT_THREADS, 1, 1], stream=stream)
        tma_op = cute.nvgpu.cpasync.CopyBulkTensorTileG2SOp()
        tma_atom_a, tma_a = cute.nvgpu.cpasync.make_tiled_tma_atom(
            tma_op, mA, cute.slice_(self.a_smem_layout, (None, None, 0)), (self.tile_m, TILE_K))
        tma_atom_b, tma_b = cute.nvgpu.cpasync.make_tiled_tma_atom(
            tma_op, mB, cute.slice_(self.b_smem_layout, (None, None, 0)), (self.tile_n, TILE_K))

        @cute.struct
        class SharedStorage:
            mainloop_barriers: cute.struct.MemRange[cutlass.Int64, self.stages * 2]
            sA: cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(self.a_smem_layout)], 1024]
            sB: cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(self.b_smem_layout)], 1024]

        self.shared_storage = SharedStorage
        rows = mA.shape[0]
        splits = mD.shape[0]
        m_blocks = (rows + (self.tile_m - 1)) // self.tile_m
        self.kernel(tma_atom_a, tma_a, tma_atom_b, tma_b, mD, mS, rows, self.tiled_mma,
                    self.a_smem_layout, self.b_smem_layout).launch(
            grid=(m_blocks, splits, 1),
            block=[self.threads_per_cta, 1, 1],
            min_blocks_per_mp=1,
            stream=stream,
        )

    @cute.kernel
    def split_kernel(self, mB32: cute.Tensor, mB: cute.Tensor):
        """One FP32 value of B per thread: ``B[r] = bf16(v)``, ``B[N + r] = bf16(v - bf16(v))``."""
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        index = bidx * SPLIT_THREADS + tidx
        if index < self.n * self.k:
            row = index // self.k
            col = index - row * self.k
            value = mB32[(row, col)]
            hi = value.to(cutlass.BFloat16)
            mB[(row, col)] = hi
            mB[(row + self.n, col)] = (value - hi.to(Float32)).to(cutlass.BFloat16)

    @cute.kernel
    def kernel(self, tma_atom_a: cute.CopyAtom, mA: cute.Tensor, tma_atom_b: cute.CopyAtom, mB: cute.Tensor,
               mD: cute.Tensor, mS: cute.Tensor, rows: Int32, tiled_mma: cute.TiledMma,
               a_smem_layout: cute.ComposedLayout, b_smem_layout: cute.ComposedLayout):
        tidx, _, _ = cute.arch.thread_idx()
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        m_block, split, _ = cute.arch.block_idx()
        _, splits, _ = cute.arch.grid_dim()
        if warp_idx == 0:
            cute.nvgpu.cpasync.prefetch_descriptor(tma_atom_a)
            cute.nvgpu.cpasync.prefetch_descriptor(tma_atom_b)

        storage = SmemAllocator().allocate(self.shared_storage)
        tx_bytes = (cute.size_in_bytes(self.ab_dtype, cute.slice_(a_smem_layout, (None, None, 0)))
                    + cute.size_in_bytes(self.ab_dtype, cute.slice_(b_smem_layout, (None, None, 0))))
        mainloop = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mainloop_barriers.data_ptr(),
            num_stages=self.stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(
                pipeline.Agent.Thread, self.num_consumer_wgs * WARPS_PER_WARPGROUP),
            tx_count=tx_bytes,
            cta_layout_vmnk=cute.make_layout((1, 1, 1, 1)),
            defer_sync=True,
        )
        pipeline_init_arrive(cluster_shape_mn=(1, 1), is_relaxed=True)
        sA = storage.sA.get_tensor(a_smem_layout.outer, swizzle=a_smem_layout.inner)
        sB = storage.sB.get_tensor(b_smem_layout.outer, swizzle=b_smem_layout.inner)
        # This split's k-tiles: [k_begin, k_end), never empty since splits <= k_tiles.
        k_begin = split * self.k_tiles // splits
        k_end = (split + 1) * self.k_tiles // splits
        warp_group_idx = cute.arch.make_warp_uniform(tidx // THREADS_PER_WARPGROUP)
        pipeline_init_wait(cluster_shape_mn=(1, 1))
        cute.arch.sync_threads()
        if warp_group_idx == 0:
            cute.arch.setmaxregister_decrease(PRODUCER_REGS)
            if warp_idx == 0:
                self.producer(tma_atom_a, mA, tma_atom_b, mB, sA, sB, mainloop, m_block, k_begin, k_end)
        else:
            cute.arch.setmaxregister_increase(CONSUMER_REGS)
            self.consumer(tiled_mma, sA, sB, mD, mS, mainloop, tidx - THREADS_PER_WARPGROUP, m_block, split,
                          rows, k_begin, k_end)

    @cute.jit
    def producer(self, tma_atom_a: cute.CopyAtom, mA: cute.Tensor, tma_atom_b: cute.CopyAtom, mB: cute.Tensor,
                 sA: cute.Tensor, sB: cute.Tensor, mainloop: pipeline.PipelineTmaAsync, m_block: Int32,
                 k_begin: Int32, k_end: Int32):
        """TMA producer: k-tiles [k_begin, k_end) of the CTA's A rows and of B into the ring."""
        gA = cute.local_tile(mA, (self.tile_m, TILE_K), (m_block, None))
        gB = cute.local_tile(mB, (self.tile_n, TILE_K), (0, None))
        tAsA, tAgA = cute.nvgpu.cpasync.tma_partition(
            tma_atom_a, 0, cute.make_layout(1), cute.group_modes(sA, 0, 2), cute.group_modes(gA, 0, 2))
        tBsB, tBgB = cute.nvgpu.cpasync.tma_partition(
            tma_atom_b, 0, cute.make_layout(1), cute.group_modes(sB, 0, 2), cute.group_modes(gB, 0, 2))
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        for k_tile in cutlass.range(k_begin, k_end, unroll=1):
            mainloop.producer_acquire(state)
            barrier = mainloop.producer_get_barrier(state)
            cute.copy(tma_atom_a, tAgA[(None, k_tile)], tAsA[(None, state.index)], tma_bar_ptr=barrier)
            cute.copy(tma_atom_b, tBgB[(None, k_tile)], tBsB[(None, state.index)], tma_bar_ptr=barrier)
            mainloop.producer_commit(state)
            state.advance()
        mainloop.producer_tail(state)

    @cute.jit
    def consumer(self, tiled_mma: cute.TiledMma, sA: cute.Tensor, sB: cute.Tensor, mD: cute.Tensor,
                 mS: cute.Tensor, mainloop: pipeline.PipelineTmaAsync, consumer_tidx: Int32, m_block: Int32,
                 split: Int32, rows: Int32, k_begin: Int32, k_end: Int32):
        """WGMMA + square-sum per k-tile, then the epilogue (D = hi + lo columns, S per row)."""
        wg_layout = cute.make_layout(self.num_consumer_wgs, stride=THREADS_PER_WARPGROUP)
        thr_mma = tiled_mma.get_slice(wg_layout(consumer_tidx // THREADS_PER_WARPGROUP))
        thr_c = tiled_mma.get_slice(consumer_tidx)
        tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
        tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
        # The tensor cores' accumulation truncates instead of rounding: a chain of hundreds of k-tiles
        # in one WGMMA accumulator loses ~1e-5 relative at K = 28672. Each k-tile's WGMMAs start from
        # zero in ``tile_acc`` and are added to ``accumulators`` with round-to-nearest FP32 adds.
        accumulators = cute.make_rmem_tensor(thr_mma.partition_shape_C((self.tile_m, self.tile_n)), Float32)
        accumulators.fill(0.0)
        tile_acc = cute.make_rmem_tensor(thr_mma.partition_shape_C((self.tile_m, self.tile_n)), Float32)
        num_k_blocks = cute.size(tCrA, mode=[2])
        sq_row = consumer_tidx // THREADS_PER_ROW
        sq_col = (consumer_tidx % THREADS_PER_ROW) * COLS_PER_THREAD
        square_sum = Float32(0.0)
        square_frag = cute.make_rmem_tensor(cute.make_layout((1, SQUARE_VEC)), self.ab_dtype)

        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        for _k_tile in cutlass.range(k_begin, k_end, unroll=1):
            mainloop.consumer_wait(state)
            cute.nvgpu.warpgroup.fence()
            for kb in cutlass.range_constexpr(num_k_blocks):
                tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, kb != 0)
                cute.gemm(tiled_mma, tile_acc, tCrA[(None, None, kb, state.index)],
                          tCrB[(None, None, kb, state.index)], tile_acc)
            cute.nvgpu.warpgroup.commit_group()
            # The WGMMAs read the stage asynchronously; reading it here as well is safe (both read).
            stage_a = sA[(None, None, state.index)]
            for v in cutlass.range_constexpr(COLS_PER_THREAD // SQUARE_VEC):
                chunk = cute.local_tile(stage_a, (1, SQUARE_VEC), (sq_row, sq_col // SQUARE_VEC + v))
                cute.autovec_copy(chunk, square_frag)
                values = square_frag.load().to(Float32)
                square_sum = square_sum + (values * values).reduce(cute.ReductionOp.ADD, 0.0, 0)
            cute.nvgpu.warpgroup.wait_group(0)
            mainloop.consumer_release(state)
            accumulators.store(accumulators.load() + tile_acc.load())
            state.advance()

        # Epilogue. Element 4j + r of the fragment sits on column block j; block j + N/8 holds the
        # low part of the same output column.
        row_base = m_block * self.tile_m
        coords = thr_c.partition_C(cute.make_identity_tensor((self.tile_m, self.tile_n)))
        lo_offset = ACC_ELEMS_PER_COL_BLOCK * (self.n // COL_BLOCK)
        for i in cutlass.range_constexpr(lo_offset):
            coord = coords[i]
            row = row_base + coord[0]
            if row < rows:
                mD[(split, row, coord[1])] = accumulators[i] + accumulators[i + lo_offset]
        square_sum = square_sum + cute.arch.shuffle_sync_bfly(square_sum, offset=1)
        row = row_base + sq_row
        if consumer_tidx % THREADS_PER_ROW == 0 and row < rows:
            mS[(split, row)] = square_sum
