"""Row reductions on the host (RMS norm; any rows -> reduce over the last axis -> elementwise function):
vector accumulators instead of one scalar chain per row.

dlight's CPU `Reduction` rule parallelizes the rows and vectorizes the elementwise blocks, but it leaves
each reduction a serial scalar loop (one dependent add per element) and keeps every intermediate block as a
full-size buffer. Here the intermediate elementwise blocks are inlined, each reduction's last axis is split
by the vector width and rfactored into `lanes` partial sums per row (a vector accumulated along the row,
then one sum of `lanes` values), and the rest follows `Reduction`: rows in parallel (when there are
enough: `cpu_parallel_guard`), every block computed
under its row, the elementwise output vectorized. Functions of another shape (or any schedule error) are
left to the rules after this one."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block, normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir.dlight.cpu import Reduction
from tvm.target import Target

from .cpu_parallel_guard import parallel_if_enough


def _is_one(extent) -> bool:
    return isinstance(extent, tirx.IntImm) and int(extent) == 1


def _leading_spatial(dom_kind: str) -> int:
    return len(dom_kind) - len(dom_kind.lstrip("S"))


class CPURowReduction(ScheduleRule):
    """The schedule above for `func`, or None (not this shape, or the rule's vector width does not divide
    a reduction's extent: `Reduction` then takes it)."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or "llvm" not in str(target.kind.name):
            return None
        try:
            return self._schedule(func)
        except (RuntimeError, ValueError, TypeError):  # TVM's errors (ScheduleError among them): next rule
            return None

    def _schedule(self, func: tirx.PrimFunc) -> s_tir.Schedule | None:
        lanes = self.lanes
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or len(infos) < 2 or not infos[-1].is_injective():
            return None
        if all(bi.is_injective() for bi in infos):
            return None
        for bi in infos[:-1]:  # the elementwise steps between input, reductions and output
            if bi.is_injective():
                sch.compute_inline(bi.block_rv)
        infos = normalize_prim_func(sch)
        if not infos or not infos[-1].is_injective():
            return None
        kinds = [bi.dom_kind() for bi in infos]
        if any(not k or k[0] != "S" for k in kinds):
            return None
        # the output's loops: rows, then one row's elements (unit rows of a static shape are gone there)
        lead = len(kinds[-1]) - 1
        if _leading_spatial(kinds[-1]) != lead + 1:
            return None
        reductions = infos[:-1]
        # only [rows..., one reduced axis] reductions, the reduced extent a multiple of the vector width
        for bi in reductions:
            k, loops = bi.dom_kind(), sch.get_loops(bi.block_rv)
            # one static row: the reduction may keep unit row loops the output has dropped
            unit_rows = lead == 0 and all(_is_one(sch.get(lp).extent) for lp in loops[:-1])
            if bi.is_injective() or not (k == "S" * lead + "R" or unit_rows and k.endswith("R")):
                return None
            ext = sch.get(loops[-1]).extent
            if not isinstance(ext, tirx.IntImm) or int(ext) % lanes or int(ext) <= lanes:
                return None
            width = int(ext)
        last_name = sch.get(infos[-1].block_rv).name_hint
        partial = []
        for bi in reductions:
            loops = sch.get_loops(bi.block_rv)
            _, inner = sch.split(loops[-1], [None, lanes])
            # partial sums last in their buffer: a row's lanes are contiguous
            rf = sch.rfactor(inner, factor_axis=len(sch.get(bi.block_rv).writes[0].region))
            partial.append(sch.get(rf).name_hint)
        last = sch.get_sblock(last_name)
        loops = sch.get_loops(last)
        if lead:  # every block under its row, rows in parallel when there are enough
            rows = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
            parallel_if_enough(sch, rows, width)
            Reduction._vectorize_inner(sch, last, lanes)
            order = [sch.get(b).name_hint for b in sch.get_child_blocks(get_root_block(sch))]
            for name in reversed([n for n in order if n != last_name]):
                sch.compute_at(sch.get_sblock(name), rows, preserve_unit_loops=True)
        else:  # one row of static shape: the blocks stay at the root, one after another
            sch.vectorize(sch.split(loops[-1], [None, lanes])[1])
        for name in partial:  # the partial sums' lane loop innermost, vectorized
            block = sch.get_sblock(name)
            inner_loops = sch.get_loops(block)[1 if lead else 0 :]
            lane_loops = [lp for lp in inner_loops if int(sch.get(lp).extent) == lanes]
            if len(lane_loops) != 1:
                return None  # the row's other loop has the same extent: which is which is not known here
            rest = [lp for lp in inner_loops if not lp.same_as(lane_loops[0])]
            sch.reorder(*rest, lane_loops[0])
            sch.vectorize(lane_loops[0])
        return sch
