"""A shared-memory ring filled by TMA and cp.async together, drained by WGMMA warpgroups (SM90).

``PipelineTmaCpAsync`` is ``cutlass.pipeline.PipelineTmaAsync`` with a second kind of producer: a
stage's full barrier completes when the TMA issuer has armed it with its transaction bytes (one
``mbarrier.arrive.expect_tx``) AND every cp.async loading thread's copies into the stage have
landed (one ``cp.async.mbarrier.arrive.noinc`` per thread: the arrival fires when the thread's
earlier cp.async operations complete, and ``noinc`` means it counts against the barrier's expected
arrivals instead of adding one). So the barrier expects ``1 + cpasync_threads`` arrivals per phase.
The empty barrier and the consumer side are unchanged (one release per consumer warp, sent to every
CTA of the multicast group).

Per stage, every producer thread: ``producer_wait_empty`` (the slot is free), then the TMA issuer
``producer_expect_tx`` and issues its TMA copies, and every loading thread issues its cp.async
copies and ``producer_cpasync_arrive``.
"""

from dataclasses import fields

import cutlass.cute as cute
import cutlass.pipeline as pipeline


class PipelineTmaCpAsync(pipeline.PipelineTmaAsync):
    """TMA + cp.async producers, async-thread (WGMMA) consumers; see the module docstring."""

    @staticmethod
    def create(*, cpasync_threads: int, **kwargs) -> "PipelineTmaCpAsync":  # type: ignore[override]
        """As ``PipelineTmaAsync.create`` (same keyword arguments but ``producer_group``); the full
        barrier expects one TMA arrival plus one per cp.async thread."""
        producers = pipeline.CooperativeGroup(pipeline.Agent.Thread, 1 + cpasync_threads)
        base = pipeline.PipelineTmaAsync.create(producer_group=producers, **kwargs)
        return PipelineTmaCpAsync(**{f.name: getattr(base, f.name) for f in fields(base)})

    def producer_wait_empty(self, state: pipeline.PipelineState) -> None:
        """Block until every consumer released the stage (every producer thread calls this)."""
        self.sync_object_empty.wait(state.index, state.phase)

    def producer_expect_tx(self, state: pipeline.PipelineState) -> None:
        """The TMA issuer's arrival: arm the stage's full barrier with the TMA bytes (one lane)."""
        self.sync_object_full.arrive(state.index, self.producer_mask)

    def producer_cpasync_arrive(self, state: pipeline.PipelineState) -> None:
        """A loading thread's arrival, fired once its cp.async copies issued so far have landed."""
        cute.arch.cp_async_mbarrier_arrive_noinc(self.producer_get_barrier(state))
