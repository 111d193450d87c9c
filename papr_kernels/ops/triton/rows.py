"""The hierarchical row ops (Swin, ConvNeXt) as Triton kernels: gather, scatter, scatter-add.

The three plain functions below are what `papr_kernels.hierarchical` calls for the "triton"
backend (the package `papr_kernels.ops.triton` exports them); they reproduce
the plain-PyTorch row ops of `papr_kernels.reference` bit for bit.

Positions. x is (B, N, C) or channels-last (B, H, W, C) with ANY strides (an NCHW tensor seen
through permute(0, 2, 3, 1), sliced views, zero strides from expand): position p of a 4-D x is
row p // W, column p % W (row-major over the grid); a 3-D x is the same with H = 1, W = N (the
kernels skip the division then: GRID = False). Every address is built in int64 (batch, row,
column and channel each cast before the multiply by their stride), so tensors past 2^31 elements
work. indices is (B, k) int64 (any strides), unique per row, in [0, N). Outside that contract
the kernels stay in bounds: an index outside [0, N) is masked off (nothing read or written
there); a position named by several indices gets one of their rows in the dense kernels.
values is (B, k, C), any strides.

The dense kernels (every output position written once) read the kept-row map instead of the
indices: row_of (B, N) int32 (any strides), row_of[b, p] = j where indices[b, j] == p, else -1
(`_kept_row_map_kernel` after a -1 fill, the map of `reference.kept_row_map`; built once per
stage by the caller, or here once per call). An entry outside [0, k) reads as a pruned
position, so no map can send a read out of bounds.

Kernels (the grid is 1-D and flattened: batch x row/position blocks x channel chunks, so no axis
meets CUDA's 65535 limit on grid y/z; every program loops over its channel chunk in BLOCK_C steps):

`_gather_kernel`      gather_rows: out[b, j, :] = x[b, indices[b, j], :], out contiguous (B, k, C).
                      One program per BLOCK_R kept rows.
                      Traffic: reads B*k*C*e of x (kept rows only) + B*k*8 indices,
                      writes B*k*C*e.

`_scatter_dense_kernel`
                      scatter_rows (HAS_X = False) and out-of-place scatter_back (HAS_X = True),
                      one fused pass over the whole output: each program owns BLOCK_P output
                      positions, looks each one's kept row j up in row_of (one int32 load),
                      then writes every element of its positions exactly once:
                          HAS_X = False: values[b, j] where kept, 0 elsewhere (the zero-fill is
                                         fused: no torch.zeros launch);
                          HAS_X = True:  x[b, p] + values[b, j] where kept, x[b, p] elsewhere
                                         (the copy is bit-exact: -0.0 stays -0.0, no `+ 0`).
                      Traffic: writes B*N*C*e; reads B*k*C*e of values, B*N*C*e of x when HAS_X
                      (x is read once: no clone pass), and B*N*4 of row_of.

`_scatter_add_inplace_kernel`
                      in-place scatter_back: x[b, indices[b, j]] += values[b, j], through x's
                      strides; a plain read-modify-write (indices unique: no atomics).
                      Traffic: reads B*k*C*e of x and of values + B*k*8, writes B*k*C*e.

The add rounds as torch's elementwise `a + b`: fp16/bf16 are converted to fp32, added, rounded
once (round to nearest even) to the dtype; fp32 adds in fp32, fp64 in fp64.
dtypes: fp16, bf16, fp32, fp64 (gather and scatter_rows only move bits: any dtype).

B = 0, k = 0 (and C = 0) launch nothing. Launchers are registered as torch.library custom ops
(papr_kernels::triton_gather_rows, _scatter_rows, _scatter_back (these two take row_of, not
indices), and the mutating
_scatter_back_ with mutates_args=("x",)) with fake implementations, so torch.compile(fullgraph=
True) traces through them without a graph break. Interpreted launches (CPU tensors under
TRITON_INTERPRET=1) hold the interpreter lock, CUDA launches run on the tensors' device and its
current stream (common.launch_guard).
"""
import math
from typing import List, Optional, Sequence

import torch

from . import common
from .common import launch_guard, next_pow2, tl, triton, widen

__all__ = ["kept_row_map", "gather_rows", "scatter_rows", "scatter_back", "gather_layer_norm",
           "masked_residual", "ROW_MAP_OPS"]

# The plain functions that take the kept-row map (`row_of=`, papr_kernels.hierarchical).
ROW_MAP_OPS = ("scatter_rows", "scatter_back", "masked_residual")


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _position_offset(p, W, s_h, s_w, GRID: tl.constexpr):
        """int64 element offset of positions p (int32, in range) in a (B, H, W, C) or (B, N, C)
        tensor with row stride s_h and column / token stride s_w."""
        if GRID:
            return (p // W).to(tl.int64) * s_h + (p % W).to(tl.int64) * s_w
        return p.to(tl.int64) * s_w

    @triton.jit
    def _split_pid(num_blocks, num_chunks):
        pid = tl.program_id(0)
        chunk = pid % num_chunks
        rest = pid // num_chunks
        return (rest // num_blocks).to(tl.int64), rest % num_blocks, chunk

    @triton.jit
    def _kept_rows(idx_ptr, s_ib, s_ij, N, KEEP, num_blocks, num_chunks, BLOCK_R: tl.constexpr):
        """This program's batch row b, kept-row numbers j, channel chunk, and the positions p of
        those rows (0 where j is past KEEP or the index is out of [0, N): masked by `ok`)."""
        b, blk, chunk = _split_pid(num_blocks, num_chunks)
        j = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        jmask = j < KEEP
        pos = tl.load(idx_ptr + b * s_ib + j.to(tl.int64) * s_ij, mask=jmask, other=0)
        ok = jmask & (pos >= 0) & (pos < N)
        return b, j, chunk, ok, tl.where(ok, pos, 0).to(tl.int32)

    @triton.jit
    def _kept_row_map_kernel(idx_ptr, map_ptr, s_ib, s_ij, N, KEEP, num_blocks,
                             BLOCK_M: tl.constexpr):
        """row_of[b, indices[b, j]] = j for this program's BLOCK_M kept rows (row_of is filled
        with -1 before); an index outside [0, N) writes nothing."""
        b, j, _, ok, p = _kept_rows(idx_ptr, s_ib, s_ij, N, KEEP, num_blocks, 1, BLOCK_M)
        tl.store(map_ptr + b * N + p.to(tl.int64), j, mask=ok)

    @triton.jit
    def _gather_kernel(
        x_ptr, idx_ptr, out_ptr,
        s_xb, s_xh, s_xw, s_xc, s_ib, s_ij,
        N, W, C, KEEP, num_blocks, num_chunks, chans_per_prog,
        GRID: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        b, j, chunk, ok, p = _kept_rows(idx_ptr, s_ib, s_ij, N, KEEP, num_blocks, num_chunks,
                                        BLOCK_R)
        src = x_ptr + b * s_xb + _position_offset(p, W, s_xh, s_xw, GRID)
        dst = out_ptr + (b * KEEP + j.to(tl.int64)) * C
        c_lo = chunk * chans_per_prog
        c_hi = tl.minimum(c_lo + chans_per_prog, C)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < c_hi
            vals = tl.load(src[:, None] + c[None, :].to(tl.int64) * s_xc,
                           mask=ok[:, None] & cmask[None, :], other=0)
            tl.store(dst[:, None] + c[None, :], vals, mask=(j < KEEP)[:, None] & cmask[None, :])

    @triton.jit
    def _f32_to_bf16(s):
        """Round to nearest even, as c10::BFloat16 does (NaN -> 0x7FC0). Done by hand on the bits:
        the interpreter's fp32 -> bf16 cast truncates, so the cast would differ between the
        interpreter and the GPU; this is the same integer arithmetic on both."""
        bits = s.to(tl.int32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(s != s, 0x7FC0, rounded)
        return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _round_to(s, like):
        """fp32 s rounded once (to nearest even) to the dtype of `like` (fp16 / bf16)."""
        if like.dtype == tl.bfloat16:
            return _f32_to_bf16(s)
        return s.to(like.dtype)

    @triton.jit
    def _add(a, v, UPCAST: tl.constexpr):
        """torch's elementwise a + v: fp16/bf16 in fp32, rounded once (to nearest even) to the
        dtype; fp32 in fp32, fp64 in fp64."""
        if UPCAST:
            return _round_to(widen(a) + widen(v), a)
        return a + v

    @triton.jit
    def _mul(a, v, UPCAST: tl.constexpr):
        """torch's elementwise a * v, rounded as `_add`."""
        if UPCAST:
            return _round_to(widen(a) * widen(v), a)
        return a * v

    @triton.jit
    def _kept_row_at(p, pmask, map_row, s_mp, KEEP):
        """For positions p: their kept row j (row_of[p], one load) and whether p is kept; a map
        entry outside [0, KEEP) reads as not kept, so no value row past KEEP is ever read."""
        row = tl.load(map_row + p.to(tl.int64) * s_mp, mask=pmask, other=-1)
        kept_p = pmask & (row >= 0) & (row < KEEP)
        return tl.where(kept_p, row, 0), kept_p

    @triton.jit
    def _dense_tile(map_ptr, s_mb, s_mp, v_ptr, s_vb, s_vj, N, C, KEEP, num_blocks, num_chunks,
                    chans_per_prog, BLOCK_P: tl.constexpr):
        """The tile of a dense-output kernel (one batch row, BLOCK_P positions, a channel range):
        (b, positions p, p < N, kept, their value rows, offsets of their output rows, c_lo, c_hi)."""
        b, blk, chunk = _split_pid(num_blocks, num_chunks)
        p = blk * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < N
        row, kept_p = _kept_row_at(p, pmask, map_ptr + b * s_mb, s_mp, KEEP)
        v_row = v_ptr + b * s_vb + row.to(tl.int64) * s_vj
        dst_off = (b * N + p.to(tl.int64)) * C
        c_lo = chunk * chans_per_prog
        return b, p, pmask, kept_p, v_row, dst_off, c_lo, tl.minimum(c_lo + chans_per_prog, C)

    @triton.jit
    def _scatter_dense_kernel(
        x_ptr, map_ptr, v_ptr, out_ptr,
        s_xb, s_xh, s_xw, s_xc, s_mb, s_mp, s_vb, s_vj, s_vc,
        N, W, C, KEEP, num_blocks, num_chunks, chans_per_prog,
        HAS_X: tl.constexpr, UPCAST: tl.constexpr, GRID: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        b, p, pmask, kept_p, v_row, dst_off, c_lo, c_hi = _dense_tile(
            map_ptr, s_mb, s_mp, v_ptr, s_vb, s_vj, N, C, KEEP, num_blocks, num_chunks,
            chans_per_prog, BLOCK_P)
        if HAS_X:
            x_pos = x_ptr + b * s_xb + _position_offset(tl.where(pmask, p, 0), W, s_xh, s_xw, GRID)
        dst = out_ptr + dst_off
        for c0 in range(c_lo, c_hi, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < c_hi
            c64 = c[None, :].to(tl.int64)
            vals = tl.load(v_row[:, None] + c64 * s_vc, mask=kept_p[:, None] & cmask[None, :],
                           other=0)
            if HAS_X:
                xv = tl.load(x_pos[:, None] + c64 * s_xc, mask=pmask[:, None] & cmask[None, :],
                             other=0)
                vals = tl.where(kept_p[:, None], _add(xv, vals, UPCAST), xv)
            tl.store(dst[:, None] + c[None, :], vals, mask=pmask[:, None] & cmask[None, :])

    @triton.jit
    def _scatter_add_inplace_kernel(
        x_ptr, idx_ptr, v_ptr,
        s_xb, s_xh, s_xw, s_xc, s_ib, s_ij, s_vb, s_vj, s_vc,
        N, W, C, KEEP, num_blocks, num_chunks, chans_per_prog,
        UPCAST: tl.constexpr, GRID: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        b, j, chunk, ok, p = _kept_rows(idx_ptr, s_ib, s_ij, N, KEEP, num_blocks, num_chunks,
                                        BLOCK_R)
        x_pos = x_ptr + b * s_xb + _position_offset(p, W, s_xh, s_xw, GRID)
        v_row = v_ptr + b * s_vb + j.to(tl.int64) * s_vj
        c_lo = chunk * chans_per_prog
        c_hi = tl.minimum(c_lo + chans_per_prog, C)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask = ok[:, None] & (c < c_hi)[None, :]
            c64 = c[None, :].to(tl.int64)
            xv = tl.load(x_pos[:, None] + c64 * s_xc, mask=mask, other=0)
            vals = tl.load(v_row[:, None] + c64 * s_vc, mask=mask, other=0)
            tl.store(x_pos[:, None] + c64 * s_xc, _add(xv, vals, UPCAST), mask=mask)


    @triton.jit
    def _gather_layer_norm_kernel(
        x_ptr, idx_ptr, w_ptr, bias_ptr, out_ptr,
        s_xb, s_xh, s_xw, s_xc, s_ib, s_ij,
        N, W, C, KEEP, num_blocks, eps,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
        GRID: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        b, j, _, ok, p = _kept_rows(idx_ptr, s_ib, s_ij, N, KEEP, num_blocks, 1, BLOCK_R)
        src = x_ptr + b * s_xb + _position_offset(p, W, s_xh, s_xw, GRID)
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        xv = tl.load(src[:, None] + c[None, :].to(tl.int64) * s_xc,
                     mask=ok[:, None] & cmask[None, :], other=0)
        acc = widen(xv) if UPCAST else xv          # fp16/bf16/fp32 in fp32, fp64 in fp64
        mean = tl.sum(acc, axis=1) / C
        centered = tl.where(cmask[None, :], acc - mean[:, None], 0)
        rstd = 1 / tl.sqrt(tl.sum(centered * centered, axis=1) / C + eps)
        y = centered * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + c, mask=cmask, other=0).to(y.dtype)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + c, mask=cmask, other=0).to(y.dtype)[None, :]
        if UPCAST:
            y = _round_to(y, xv)
        dst = out_ptr + (b * KEEP + j.to(tl.int64)) * C
        tl.store(dst[:, None] + c[None, :], y.to(xv.dtype),
                 mask=(j < KEEP)[:, None] & cmask[None, :])

    @triton.jit
    def _masked_residual_kernel(
        s_ptr, map_ptr, v_ptr, g_ptr, out_ptr,
        s_sb, s_sh, s_sw, s_sc, s_mb, s_mp, s_vb, s_vj, s_vc,
        N, W, C, KEEP, num_blocks, num_chunks, chans_per_prog,
        HAS_GAMMA: tl.constexpr, UPCAST: tl.constexpr, GRID: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        b, p, pmask, kept_p, v_row, dst_off, c_lo, c_hi = _dense_tile(
            map_ptr, s_mb, s_mp, v_ptr, s_vb, s_vj, N, C, KEEP, num_blocks, num_chunks,
            chans_per_prog, BLOCK_P)
        s_pos = s_ptr + b * s_sb + _position_offset(tl.where(kept_p, p, 0), W, s_sh, s_sw, GRID)
        dst = out_ptr + dst_off
        for c0 in range(c_lo, c_hi, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < c_hi
            c64 = c[None, :].to(tl.int64)
            kmask = kept_p[:, None] & cmask[None, :]
            vals = tl.load(v_row[:, None] + c64 * s_vc, mask=kmask, other=0)
            if HAS_GAMMA:
                vals = _mul(vals, tl.load(g_ptr + c, mask=cmask, other=0)[None, :], UPCAST)
            kept = _add(vals, tl.load(s_pos[:, None] + c64 * s_sc, mask=kmask, other=0), UPCAST)
            tl.store(dst[:, None] + c[None, :], tl.where(kept_p[:, None], kept, 0),
                     mask=pmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
# GPU tiles: kept rows x channels (gather, in-place add), positions x channels (dense kernels),
# kept rows of the map (one int each).
BLOCK_R = 16
BLOCK_P = 32
BLOCK_C = 64
BLOCK_M = 1024
# The interpreter runs programs one after another, op by op in numpy: few, big programs.
_INTERP_BLOCKS = dict(BLOCK_R=256, BLOCK_P=256, BLOCK_C=256, BLOCK_M=1024)
# Tests force tiny blocks / several channel chunks through common.BLOCK_OVERRIDE / SPLIT_OVERRIDE.

_UPCAST = (torch.float16, torch.bfloat16)


def block_sizes(channels: int, interpreted: bool = False) -> dict:
    """Tile sizes for a launch (also used for ahead-of-time compiles)."""
    blocks = dict(_INTERP_BLOCKS if interpreted else
                  dict(BLOCK_R=BLOCK_R, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, BLOCK_M=BLOCK_M))
    if common.BLOCK_OVERRIDE is not None:
        blocks.update(common.BLOCK_OVERRIDE)
    blocks["BLOCK_C"] = max(1, min(blocks["BLOCK_C"], next_pow2(channels)))
    return blocks


def _grid_args(t: torch.Tensor):
    """(N, W, stride_b, stride_h, stride_w, stride_c, GRID) of a (B, N, C) / (B, H, W, C) tensor."""
    if t.dim() == 3:
        return t.shape[1], t.shape[1], t.stride(0), 0, t.stride(1), t.stride(2), False
    _, h, w, _ = t.shape
    return h * w, w, t.stride(0), t.stride(1), t.stride(2), t.stride(3), True


def _plan(batch: int, count: int, channels: int, block: int, blocks: dict, sms: int):
    """1-D grid, blocks of `count` rows/positions, channel chunks, channels per chunk."""
    num_blocks, chunks = common.split(batch, count, channels, block, blocks["BLOCK_C"], sms,
                                      per_block=True)
    chans_per = -(-channels // chunks)
    chunks = -(-channels // chans_per)
    programs = batch * num_blocks * chunks
    if programs >= 2**31:   # the flattened program id is an int32
        raise ValueError(f"{programs} programs is more than a 1-D Triton grid holds (2^31 - 1)")
    return (programs,), num_blocks, chunks, chans_per


def _launch_kept_row_map(indices: torch.Tensor, num_positions: int) -> torch.Tensor:
    """reference.kept_row_map in two launches: the -1 fill and one scatter of the k rows."""
    batch, keep = indices.shape
    row_of = torch.full((batch, num_positions), -1, dtype=torch.int32, device=indices.device)
    if row_of.numel() == 0 or keep == 0:
        return row_of
    block = block_sizes(1, common.interpreted(indices.device))["BLOCK_M"]
    num_blocks = -(-keep // block)
    with launch_guard(indices.device):
        _kept_row_map_kernel[(batch * num_blocks,)](
            indices, row_of, indices.stride(0), indices.stride(1), num_positions, keep,
            num_blocks, BLOCK_M=block)
    return row_of


def _launch_gather(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    batch, keep, channels = x.shape[0], indices.shape[1], x.shape[-1]
    out = torch.empty(batch, keep, channels, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    n, w, sb, sh, sw, sc, grid_4d = _grid_args(x)
    blocks = block_sizes(channels, common.interpreted(x.device))
    grid, num_blocks, chunks, chans_per = _plan(batch, keep, channels, blocks["BLOCK_R"],
                                                blocks, common.multiprocessors(x.device))
    with launch_guard(x.device):
        _gather_kernel[grid](
            x, indices, out, sb, sh, sw, sc, indices.stride(0), indices.stride(1),
            n, w, channels, keep, num_blocks, chunks, chans_per,
            GRID=grid_4d, BLOCK_R=blocks["BLOCK_R"], BLOCK_C=blocks["BLOCK_C"])
    return out


def _launch_dense(x: Optional[torch.Tensor], row_of: torch.Tensor, values: torch.Tensor,
                  shape: Sequence[int]) -> torch.Tensor:
    """scatter_rows (x None) or out-of-place scatter_back: one pass writing the whole output."""
    batch, keep, channels = shape[0], values.shape[1], shape[-1]
    ref = values if x is None else x
    if x is None and keep == 0:
        return torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    if x is not None and keep == 0:
        return x.clone(memory_format=torch.contiguous_format)
    out = torch.empty(shape, dtype=ref.dtype, device=ref.device)
    if out.numel() == 0:
        return out
    src = x if x is not None else out   # out only stands in for x's (unused) pointer and strides
    n, w, sb, sh, sw, sc, grid_4d = _grid_args(src)
    blocks = block_sizes(channels, common.interpreted(ref.device))
    grid, num_blocks, chunks, chans_per = _plan(batch, n, channels, blocks["BLOCK_P"], blocks,
                                                common.multiprocessors(ref.device))
    with launch_guard(ref.device):
        _scatter_dense_kernel[grid](
            src, row_of, values, out, sb, sh, sw, sc, row_of.stride(0), row_of.stride(1),
            values.stride(0), values.stride(1), values.stride(2),
            n, w, channels, keep, num_blocks, chunks, chans_per,
            HAS_X=x is not None, UPCAST=ref.dtype in _UPCAST, GRID=grid_4d,
            BLOCK_P=blocks["BLOCK_P"], BLOCK_C=blocks["BLOCK_C"])
    return out


def _launch_add_inplace(x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    batch, keep, channels = x.shape[0], indices.shape[1], x.shape[-1]
    if batch == 0 or keep == 0 or channels == 0:
        return
    n, w, sb, sh, sw, sc, grid_4d = _grid_args(x)
    blocks = block_sizes(channels, common.interpreted(x.device))
    grid, num_blocks, chunks, chans_per = _plan(batch, keep, channels, blocks["BLOCK_R"],
                                                blocks, common.multiprocessors(x.device))
    with launch_guard(x.device):
        _scatter_add_inplace_kernel[grid](
            x, indices, values, sb, sh, sw, sc, indices.stride(0), indices.stride(1),
            values.stride(0), values.stride(1), values.stride(2),
            n, w, channels, keep, num_blocks, chunks, chans_per,
            UPCAST=x.dtype in _UPCAST, GRID=grid_4d,
            BLOCK_R=blocks["BLOCK_R"], BLOCK_C=blocks["BLOCK_C"])


# gather_layer_norm holds whole rows in one tile (the statistics need every channel): up to
# this many elements per program on a GPU, and channels up to MAX_NORM_CHANNELS; wider rows
# take the composition (the gather kernel, then torch's layer_norm).
_NORM_TILE = 4096
MAX_NORM_CHANNELS = 8192   # sm_90: 129 registers, no spill (16384 spilled 456 B: gpu_report)


def norm_block_sizes(channels: int, interpreted: bool = False):
    """(BLOCK_R, BLOCK_C) of gather_layer_norm: whole rows, _NORM_TILE elements on a GPU."""
    block_c = next_pow2(channels)
    block_r = block_sizes(channels, interpreted)["BLOCK_R"]
    if not interpreted:
        block_r = max(1, min(block_r, _NORM_TILE // block_c))
    return block_r, block_c


def _dense(param: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A per-channel parameter as the kernels read it (at c): C contiguous values."""
    return None if param is None else param.contiguous()


def _launch_gather_layer_norm(x: torch.Tensor, indices: torch.Tensor,
                              weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                              eps: float) -> torch.Tensor:
    batch, keep, channels = x.shape[0], indices.shape[1], x.shape[-1]
    if channels > MAX_NORM_CHANNELS:
        return torch.nn.functional.layer_norm(_launch_gather(x, indices), (channels,), weight,
                                              bias, eps)
    out = torch.empty(batch, keep, channels, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    weight, bias = _dense(weight), _dense(bias)
    n, w, sb, sh, sw, sc, grid_4d = _grid_args(x)
    block_r, block_c = norm_block_sizes(channels, common.interpreted(x.device))
    num_blocks = -(-keep // block_r)
    with launch_guard(x.device):
        _gather_layer_norm_kernel[(batch * num_blocks,)](
            x, indices, x if weight is None else weight, x if bias is None else bias, out,
            sb, sh, sw, sc, indices.stride(0), indices.stride(1),
            n, w, channels, keep, num_blocks, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            UPCAST=x.dtype != torch.float64, GRID=grid_4d, BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def _launch_masked_residual(shortcut: torch.Tensor, row_of: torch.Tensor, values: torch.Tensor,
                            gamma: Optional[torch.Tensor]) -> torch.Tensor:
    """ConvNeXt's block output in one pass: every position written once, the shortcut read at
    the kept positions only."""
    batch, keep, channels = shortcut.shape[0], values.shape[1], shortcut.shape[-1]
    out = torch.empty(shortcut.shape, dtype=shortcut.dtype, device=shortcut.device)
    if out.numel() == 0:
        return out
    gamma = _dense(gamma)
    n, w, sb, sh, sw, sc, grid_4d = _grid_args(shortcut)
    blocks = block_sizes(channels, common.interpreted(out.device))
    grid, num_blocks, chunks, chans_per = _plan(batch, n, channels, blocks["BLOCK_P"], blocks,
                                                common.multiprocessors(out.device))
    with launch_guard(out.device):
        _masked_residual_kernel[grid](
            shortcut, row_of, values, shortcut if gamma is None else gamma, out,
            sb, sh, sw, sc, row_of.stride(0), row_of.stride(1),
            values.stride(0), values.stride(1), values.stride(2),
            n, w, channels, keep, num_blocks, chunks, chans_per,
            HAS_GAMMA=gamma is not None, UPCAST=out.dtype in _UPCAST, GRID=grid_4d,
            BLOCK_P=blocks["BLOCK_P"], BLOCK_C=blocks["BLOCK_C"],
            **common.no_fp_fusion(out.device))
    return out


# ----------------------------------------------------------------------------------------------
# torch.library wrapping: opaque custom ops with fake implementations (no graph break)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("papr_kernels::triton_kept_row_map", mutates_args=())
def triton_kept_row_map(indices: torch.Tensor, num_positions: int) -> torch.Tensor:
    return _launch_kept_row_map(indices, num_positions)


@triton_kept_row_map.register_fake
def _(indices, num_positions):
    return indices.new_empty(indices.shape[0], num_positions, dtype=torch.int32)


@torch.library.custom_op("papr_kernels::triton_gather_rows", mutates_args=())
def triton_gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return _launch_gather(x, indices)


@triton_gather_rows.register_fake
def _(x, indices):
    return x.new_empty(x.shape[0], indices.shape[1], x.shape[-1])


@torch.library.custom_op("papr_kernels::triton_scatter_rows", mutates_args=())
def triton_scatter_rows(values: torch.Tensor, row_of: torch.Tensor,
                        shape: List[int]) -> torch.Tensor:
    return _launch_scatter_rows(values, row_of, shape)


def _launch_scatter_rows(values: torch.Tensor, row_of: torch.Tensor, shape: List[int]):
    return _launch_dense(None, row_of, values, shape)


@triton_scatter_rows.register_fake
def _(values, row_of, shape):
    return values.new_empty(shape)


@torch.library.custom_op("papr_kernels::triton_scatter_back", mutates_args=())
def triton_scatter_back(x: torch.Tensor, row_of: torch.Tensor,
                        values: torch.Tensor) -> torch.Tensor:
    return _launch_scatter_back(x, row_of, values)


def _launch_scatter_back(x: torch.Tensor, row_of: torch.Tensor, values: torch.Tensor):
    return _launch_dense(x, row_of, values, x.shape)


@triton_scatter_back.register_fake
def _(x, row_of, values):
    return x.new_empty(x.shape)   # contiguous, as the kernel's output


@torch.library.custom_op("papr_kernels::triton_scatter_back_", mutates_args=("x",))
def triton_scatter_back_(x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    _launch_add_inplace(x, indices, values)


@triton_scatter_back_.register_fake
def _(x, indices, values):
    return None


@torch.library.custom_op("papr_kernels::triton_gather_layer_norm", mutates_args=())
def triton_gather_layer_norm(x: torch.Tensor, indices: torch.Tensor,
                             weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                             eps: float) -> torch.Tensor:
    return _launch_gather_layer_norm(x, indices, weight, bias, eps)


@triton_gather_layer_norm.register_fake
def _(x, indices, weight, bias, eps):
    return x.new_empty(x.shape[0], indices.shape[1], x.shape[-1])


@torch.library.custom_op("papr_kernels::triton_masked_residual", mutates_args=())
def triton_masked_residual(shortcut: torch.Tensor, row_of: torch.Tensor, values: torch.Tensor,
                           gamma: Optional[torch.Tensor]) -> torch.Tensor:
    return _launch_masked_residual(shortcut, row_of, values, gamma)


@triton_masked_residual.register_fake
def _(shortcut, row_of, values, gamma):
    return shortcut.new_empty(shortcut.shape)   # contiguous, as the kernel's output


# ----------------------------------------------------------------------------------------------
# The plain functions (hierarchical's implementation interface)
# ----------------------------------------------------------------------------------------------
def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """out[b, j] = x at position indices[b, j]: a new contiguous (B, k, C) tensor."""
    return common.call(triton_gather_rows, _launch_gather, x, indices)


def kept_row_map(indices: torch.Tensor, num_positions: int) -> torch.Tensor:
    """(B, N) int32: row_of[b, p] = j where indices[b, j] == p, else -1 (reference.kept_row_map,
    the same map)."""
    return common.call(triton_kept_row_map, _launch_kept_row_map, indices, num_positions)


def _row_map(row_of: Optional[torch.Tensor], indices: torch.Tensor, shape) -> torch.Tensor:
    """The caller's kept-row map of `indices`, or one built for this call."""
    if row_of is not None:
        return row_of
    return kept_row_map(indices, math.prod(shape[1:-1]))


def scatter_rows(values: torch.Tensor, indices: torch.Tensor, shape,
                 row_of: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A new contiguous tensor of `shape`, zero except rows indices[b, j] = values[b, j].
    `row_of`: `reference.kept_row_map` of indices, built here when None."""
    shape = [int(s) for s in shape]
    return common.call(triton_scatter_rows, _launch_scatter_rows, values,
                       _row_map(row_of, indices, shape), shape)


def scatter_back(x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                 inplace: bool = False, row_of: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x with values[b, j] added at positions indices[b, j] (torch's rounding of a + b).
    inplace=False: a new contiguous tensor (`row_of` as for scatter_rows); inplace=True: written
    into x (its strides), x returned."""
    if inplace:
        triton_scatter_back_(x, indices, values)
        return x
    return common.call(triton_scatter_back, _launch_scatter_back, x,
                       _row_map(row_of, indices, x.shape), values)


def gather_layer_norm(x: torch.Tensor, indices: torch.Tensor, weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """LayerNorm over the channels of x's rows at `indices`: a new contiguous (B, k, C)."""
    return common.call(triton_gather_layer_norm, _launch_gather_layer_norm, x, indices, weight,
                       bias, eps)


def masked_residual(shortcut: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                    gamma: Optional[torch.Tensor], row_of: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """values * gamma + shortcut at `indices`, zero elsewhere: a new contiguous tensor of
    shortcut's shape (`row_of` as for scatter_rows)."""
    return common.call(triton_masked_residual, _launch_masked_residual, shortcut,
                       _row_map(row_of, indices, shortcut.shape), values, gamma)
