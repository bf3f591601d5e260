"""The traffic estimate of benchmarks/gpu_traffic.py (README's GPU figures) on a hand-written
optimized HLO module: loop trips, slices read through fusions, in-place updates."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import gpu_traffic  # noqa: E402

HLO = """HloModule m, is_scheduled=true

%fused_slice (param_0.1: s8[4,100], param_1.1: s32[]) -> f32[1,100] {
  %param_0.1 = s8[4,100]{1,0} parameter(0)
  %param_1.1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %slice.1 = s8[1,100]{1,0} dynamic-slice(%param_0.1, %param_1.1, %zero), dynamic_slice_sizes={1,100}
  ROOT %convert.1 = f32[1,100]{1,0} convert(%slice.1)
}

%fused_update (param_0.2: u16[4,10], param_1.2: u16[1,10], param_2.2: s32[]) -> u16[4,10] {
  %param_0.2 = u16[4,10]{1,0} parameter(0)
  %param_1.2 = u16[1,10]{1,0} parameter(1)
  %param_2.2 = s32[] parameter(2)
  %zero.2 = s32[] constant(0)
  ROOT %dus.2 = u16[4,10]{1,0} dynamic-update-slice(%param_0.2, %param_1.2, %param_2.2, %zero.2)
}

%fused_whole (param_0.3: s8[4,100]) -> f32[4,100] {
  %param_0.3 = s8[4,100]{1,0} parameter(0)
  ROOT %convert.3 = f32[4,100]{1,0} convert(%param_0.3)
}

%body (p: (s32[], s8[4,100], u16[4,10], u16[1,10])) -> (s32[], s8[4,100], u16[4,10], u16[1,10]) {
  %p = (s32[], s8[4,100]{1,0}, u16[4,10]{1,0}, u16[1,10]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = s8[4,100]{1,0} get-tuple-element(%p), index=1
  %kv = u16[4,10]{1,0} get-tuple-element(%p), index=2
  %new = u16[1,10]{1,0} get-tuple-element(%p), index=3
  %rows = f32[1,100]{1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
  %kv.1 = u16[4,10]{1,0} fusion(%kv, %new, %i), kind=kLoop, calls=%fused_update
  ROOT %t = (s32[], s8[4,100]{1,0}, u16[4,10]{1,0}, u16[1,10]{1,0}) tuple(%i, %w, %kv.1, %new)
}

%cond (p.1: (s32[], s8[4,100], u16[4,10], u16[1,10])) -> pred[] {
  %p.1 = (s32[], s8[4,100]{1,0}, u16[4,10]{1,0}, u16[1,10]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  ROOT %lt = pred[] compare(%i.1, %i.1), direction=LT
}

ENTRY %main (a: s8[4,100], b: u16[4,10], c: u16[1,10]) -> f32[4,100] {
  %a = s8[4,100]{1,0} parameter(0)
  %b = u16[4,10]{1,0} parameter(1)
  %c = u16[1,10]{1,0} parameter(2)
  %zero.4 = s32[] constant(0)
  %t.1 = (s32[], s8[4,100]{1,0}, u16[4,10]{1,0}, u16[1,10]{1,0}) tuple(%zero.4, %a, %b, %c)
  %loop = (s32[], s8[4,100]{1,0}, u16[4,10]{1,0}, u16[1,10]{1,0}) while(%t.1), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %all = f32[4,100]{1,0} fusion(%a), kind=kLoop, calls=%fused_whole
}
"""  # noqa: E501


def test_estimate_counts_trips_slices_and_in_place_updates():
    total, rows = gpu_traffic.traffic(HLO, branch_share=1.0)
    per_trip = (100 + 4 + 400) + (20 + 4 + 20)  # the slice + index + f32 rows; update in place
    condition = 4 + 4 + 1  # two s32 reads, a pred written; runs trips + 1 times
    whole = 400 + 1600  # the entry's fusion reads all of `a` and writes float32
    assert total == 4 * per_trip + 5 * condition + whole
    assert [r[0] for r in rows[:2]] == [4 * (100 + 4 + 400), whole]  # largest first
    assert gpu_traffic.distinct_experts(1, 2, 8) == pytest.approx(2.0)
    assert gpu_traffic.distinct_experts(8, 2, 8) == pytest.approx(8 * (1 - 0.75**8))
