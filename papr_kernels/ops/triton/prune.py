"""The "triton" backend: PaPr pruning as one fused Triton kernel forward and one backward.

Forward, ONE launch of `_prune_fwd_kernel`, grid (B, row_chunks, channel_chunks). Every program
    1. averages the K channels of f[b] over the source grid S = h*w (or t*h*w) in float64, in
       the one summation order of every compiled backend (papr_core.h's channel_sum: a [16,
       BLOCK_S] tile whose row j accumulates channels j, j + 16, ..., the rows then added in
       order), divided by K as torch's mean does; f is read through its strides, so the
       channels_last f a proposal network returns needs no copy to NCHW first (`flat_strides`),
    2. resizes that map to the N patch scores in float64 with PyTorch's upsample arithmetic for
       double input, step by step: bicubic (A = -0.75, clamped taps, x taps first, then y) for
       4-D f, trilinear (w, h, t) for 5-D f, both align_corners; the scales are
       area_pixel_compute_scale<double> computed on the host as Python floats and passed as their
       int64 bits (a float argument would reach the kernel as fp32); the tap index is floorf of
       the source coordinate, as ATen's guard_index_and_lambda does. Then each score is rounded
       ONCE to float32 (SPEC semantics 1): summation-order differences of a few float64 ULP
       vanish in that rounding, and constant regions of f tie exactly. Launched without FMA
       contraction (enable_fp_fusion=False), so the float64 operations are the cpp and cuda
       kernels' and the scores equal theirs bit for bit. The scores are computed
       CHUNK patches per iteration of a runtime loop (CHUNK = 32 * num_warps: one score per thread
       at a time), each chunk's keys (step 3) merged into a [N / CHUNK, CHUNK] tile: only one
       chunk's float64 temporaries are live, where the whole-N version spilled (sm_90, N = 3136:
       616 B; now 0 B spills and no stack frame in every gpu_report specialization),
    3. ranks the N scores with SPEC's total order by a bitonic sort of packed int64 keys
       (order-preserving score bits << 32 | (2^31 - 1 - index)): descending score, ties to the lower
       index, -0.0 == +0.0 (score + 0.0), NaN as -inf. The compare-exchange of each stage picks the
       two halves with masked tl.sum over a [A, 2, D] reshape (no tl.sort: under TRITON_INTERPRET
       tl.sort's xor-reduction is a Python loop per element; this network is a few numpy ops per
       stage, and on a GPU it is the same network tl.sort builds). The merge levels are a runtime
       loop and ascending blocks are complemented (~key) so every stage is the same descending
       half-cleaner: each of the LOG_N distinct stages is emitted once, not all LOG_N*(LOG_N+1)/2
       (N = 4096: 12 instead of 78; sm_90 compile 31 s -> 3 s, cubin 1.0 MB -> 0.2 MB, no spills).
       order="spatial" sorts the k kept indices again, ascending (the same loop, a second pass
       over the complemented indices; the complementing runs after both passes, the identity
       after the second, so no per-pass flag lives across the network: ptxas spilled it),
    4. copies its chunk of output rows (prefix rows, then kept rows in output order) and channels
       from x to out, and (channel chunk 0 only) writes the int64 indices of its rows.
    Programs of one batch row recompute steps 1-3 (cheap next to a second launch and a round trip
    through global memory); their f reads after the first come from L2 (they are adjacent in
    launch order).

Backward, ONE launch of `_prune_bwd_kernel`, grid (B, token_chunks, channel_chunks): each program
    finds, for each token of its chunk, its output row by comparing with the k saved indices
    (a [BLOCK_T, BLOCK_J] compare-and-sum, no inverse-permutation pass), and writes the full
    gradient row: grad_out's row for prefix and kept tokens, zeros for pruned ones. Every element
    of grad_x is written exactly once by one program: no atomics, no zero-fill launch.

Bytes-moved model (minimum traffic; e_x = element size of x, e_f of f, B batch, n = P + N tokens,
k kept, C channels, K proposal channels, S source positions):
    forward   f: B*K*S*e_f  read once from DRAM (re-reads by the other programs of a row hit L2)
              x: B*(P+k)*C*e_x read (only the kept rows: pruned rows are never touched)
              out: B*(P+k)*C*e_x written, indices: B*k*8 written
              e.g. ViT-B/16, B=256, fp16, z=0.5, MobileOne-S0 f (1024x7x7, fp16):
              f 25.7 MB + x 38.9 MB + out 38.9 MB + idx 0.2 MB = 103.7 MB -> ~31 us at 3.35 TB/s.
    backward  grad_out: B*(P+k)*C*e_x read, indices B*k*8 read (per program, from L2),
              grad_x: B*n*C*e_x written (zeros included: they are part of the result).
              e.g. the same shapes: 38.9 + 77.5 MB -> ~35 us at 3.35 TB/s.
Launches: 1 forward + 1 backward (the host only allocates out/indices/grad_x with torch.empty).

The kernels are registered as torch.library custom ops (papr_kernels::triton_prune_forward /
_backward) with fake implementations, so torch.compile(prune, fullgraph=True) traces through
without a graph break.

x may be any float dtype (fp16, bf16, fp32, fp64: the copy is dtype-agnostic); f fp16, bf16,
fp32 or fp64 (loaded and converted to float64, as the reference does with f.double()). Source grids
larger than MAX_SOURCE positions (f spatial size; MobileOne-S0 gives 7x7) and patch grids larger
than MAX_PATCHES (the 2**LOG_N sort keys live in one program's registers) are outside the kernel's
register budget: forward and backward then run on the fastest other backend that can run on the
tensors' device (`fallback_backend`: the extension's "cuda" kernel on CUDA when built, else the
"torch" reference; "cpp" then "torch" on CPU), with the same results (`fallback_reason`).

Duplicate indices (only reachable by calling torch.ops.papr_kernels.triton_prune_backward
directly: prune's indices are unique) stay in bounds: a patch named by several indices gets a zero
gradient row (as if pruned), an index outside [0, N) names no patch.
"""
import functools
import math
import struct
from typing import List, Optional, Tuple

import torch

from ... import backends
from . import common
from .common import launch_guard, next_pow2, tl, triton, widen

MAX_SOURCE = 1024          # largest f spatial size (h*w or t*h*w): its float64 mean lives in registers
LANES = 16                 # papr_core.h's kChannelLanes: the channel mean's summation order
S_CHUNK = 64               # source positions per [LANES, S_CHUNK] tile of the channel mean
MEAN_WARPS = 4             # channel_mean's programs
MAX_PATCHES = 4096         # largest N whose sort fits one program's registers (gpu_report compiles it)
_INT64_MIN = -(1 << 63)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
if triton is not None:

    _INT64_MIN_C = tl.constexpr(_INT64_MIN)
    LANES_C = tl.constexpr(LANES)

    @triton.jit
    def _cubic1(x):
        # cubic_convolution1(x, A = -0.75) = ((A + 2) * x - (A + 3)) * x * x + 1
        return ((1.25 * x - 2.25) * x) * x + 1.0

    @triton.jit
    def _cubic2(x):
        # cubic_convolution2(x, A = -0.75) = ((A * x - 5A) * x + 8A) * x - 4A
        return ((-0.75 * x + 3.75) * x - 6.0) * x + 3.0

    @triton.jit
    def _as_double(bits):
        """A float64 passed as its int64 bits (Triton passes Python floats as fp32)."""
        return bits.to(tl.int64).to(tl.float64, bitcast=True)

    @triton.jit
    def _src_index(o, size_in, scale_hi, scale_lo, ALIGN: tl.constexpr, CUBIC: tl.constexpr):
        """ATen's area_pixel_compute_source_index<double> + guard_index_and_lambda: (index,
        lambda), float64. The index is floorf(real): ATen floors the float32 rounding of the
        double (so e.g. 5.99999999999 gives index 6, lambda 0), and so does this.
        ATen's CPU build fuses `scale * (o + 0.5) - 0.5` into one FMA (one rounding); the scale
        comes split (scale_hi + scale_lo, 26 + 27 bits) so that both products with o + 0.5 are
        exact and so is `hi * h - 0.5`: the one rounding is the final add, on every device and
        in the interpreter (whose tl.fma is not fused), whether or not the compiler contracts."""
        of = o.to(tl.float64)
        if ALIGN:
            real = (scale_hi + scale_lo) * of
        else:
            h = of + 0.5
            real = (scale_hi * h - 0.5) + scale_lo * h
            if not CUBIC:
                real = tl.where(real < 0.0, 0.0, real)
        i0 = tl.minimum(tl.floor(real.to(tl.float32)).to(tl.int32), size_in - 1)
        lam = tl.minimum(tl.maximum(real - i0.to(tl.float64), 0.0), 1.0)
        return i0, lam

    @triton.jit
    def _cubic_row(m, base, ix, in_w, w0, w1, w2, w3):
        """Sum of the 4 clamped x taps of source row `base`, left to right as ATen does."""
        v0 = tl.gather(m, base + tl.minimum(tl.maximum(ix - 1, 0), in_w - 1), 0)
        v1 = tl.gather(m, base + tl.minimum(tl.maximum(ix, 0), in_w - 1), 0)
        v2 = tl.gather(m, base + tl.minimum(tl.maximum(ix + 1, 0), in_w - 1), 0)
        v3 = tl.gather(m, base + tl.minimum(tl.maximum(ix + 2, 0), in_w - 1), 0)
        return v0 * w0 + v1 * w1 + v2 * w2 + v3 * w3

    @triton.jit
    def _linear_taps(o, size_in, size_out, scale_hi, scale_lo, ALIGN: tl.constexpr):
        """ATen's compute_source_index_and_lambda for linear modes: (i0, i1, l0, l1)."""
        i0, l1 = _src_index(o, size_in, scale_hi, scale_lo, ALIGN, False)
        i1 = i0 + (i0 < size_in - 1).to(tl.int32)
        l0 = 1.0 - l1
        same = size_in == size_out
        i0 = tl.where(same, o, i0)
        i1 = tl.where(same, o, i1)
        l0 = tl.where(same, 1.0, l0)
        l1 = tl.where(same, 0.0, l1)
        return i0, i1, l0, l1

    @triton.jit
    def _score_keys(m, p, N, in_t, in_h, in_w, out_t, out_h, out_w, st_hi, st_lo, sh_hi, sh_lo,
                    sw_hi, sw_lo, ALIGN: tl.constexpr, VIDEO: tl.constexpr):
        """Packed int64 sort keys of patches p: the float64 resize of the mean map m at p (ATen's
        double upsample arithmetic), rounded once to float32, as order-preserving score bits << 32
        | (2^31 - 1 - p); patches p >= N get the smallest key."""
        valid = p < N
        pc = tl.where(valid, p, 0)
        ox = pc % out_w
        oy = (pc // out_w) % out_h
        if VIDEO:
            ot = pc // (out_w * out_h)
            t0, t1, lt0, lt1 = _linear_taps(ot, in_t, out_t, st_hi, st_lo, ALIGN)
            y0, y1, ly0, ly1 = _linear_taps(oy, in_h, out_h, sh_hi, sh_lo, ALIGN)
            x0, x1, lx0, lx1 = _linear_taps(ox, in_w, out_w, sw_hi, sw_lo, ALIGN)
            hw = in_h * in_w
            a00 = tl.gather(m, t0 * hw + y0 * in_w + x0, 0) * lx0 \
                + tl.gather(m, t0 * hw + y0 * in_w + x1, 0) * lx1
            a01 = tl.gather(m, t0 * hw + y1 * in_w + x0, 0) * lx0 \
                + tl.gather(m, t0 * hw + y1 * in_w + x1, 0) * lx1
            a10 = tl.gather(m, t1 * hw + y0 * in_w + x0, 0) * lx0 \
                + tl.gather(m, t1 * hw + y0 * in_w + x1, 0) * lx1
            a11 = tl.gather(m, t1 * hw + y1 * in_w + x0, 0) * lx0 \
                + tl.gather(m, t1 * hw + y1 * in_w + x1, 0) * lx1
            b0 = a00 * ly0 + a01 * ly1
            b1 = a10 * ly0 + a11 * ly1
            score = b0 * lt0 + b1 * lt1
        else:
            ix, tx = _src_index(ox, in_w, sw_hi, sw_lo, ALIGN, True)
            iy, ty = _src_index(oy, in_h, sh_hi, sh_lo, ALIGN, True)
            wx0 = _cubic2(tx + 1.0)
            wx1 = _cubic1(tx)
            wx2 = _cubic1(1.0 - tx)
            wx3 = _cubic2((1.0 - tx) + 1.0)
            wy0 = _cubic2(ty + 1.0)
            wy1 = _cubic1(ty)
            wy2 = _cubic1(1.0 - ty)
            wy3 = _cubic2((1.0 - ty) + 1.0)
            r0 = _cubic_row(m, tl.minimum(tl.maximum(iy - 1, 0), in_h - 1) * in_w, ix, in_w,
                            wx0, wx1, wx2, wx3)
            r1 = _cubic_row(m, tl.minimum(tl.maximum(iy, 0), in_h - 1) * in_w, ix, in_w,
                            wx0, wx1, wx2, wx3)
            r2 = _cubic_row(m, tl.minimum(tl.maximum(iy + 1, 0), in_h - 1) * in_w, ix, in_w,
                            wx0, wx1, wx2, wx3)
            r3 = _cubic_row(m, tl.minimum(tl.maximum(iy + 2, 0), in_h - 1) * in_w, ix, in_w,
                            wx0, wx1, wx2, wx3)
            score = r0 * wy0 + r1 * wy1 + r2 * wy2 + r3 * wy3
        score = score.to(tl.float32)
        score = tl.where(score != score, float("-inf"), score) + 0.0
        bits = score.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        keys = (ordered.to(tl.int64) << 32) + (0x7FFFFFFF - p).to(tl.int64)
        return tl.where(valid, keys, _INT64_MIN_C)

    @triton.jit
    def _half_cleaner(keys, i: tl.constexpr, LOG_N: tl.constexpr):
        """One bitonic stage, every pair descending: partners 2**i apart, the larger key first.
        Masked sums over a [A, 2, D] view pick the two halves (no direction tensor)."""
        N: tl.constexpr = 1 << LOG_N
        D: tl.constexpr = 1 << i
        A: tl.constexpr = N // (2 * D)
        h = tl.reshape(keys, (A, 2, D))
        side = tl.arange(0, 2)[None, :, None]
        left = tl.sum(tl.where(side == 0, h, 0), axis=1)
        right = tl.sum(tl.where(side == 1, h, 0), axis=1)
        h = tl.where(side == 0, tl.maximum(left, right)[:, None, :],
                     tl.minimum(left, right)[:, None, :])
        return tl.reshape(h, (N,))

    @triton.jit
    def _bitonic_sort(keys, pos, LOG_N: tl.constexpr):
        """Sort int64 keys (2**LOG_N of them, pos = arange) descending with a bitonic network.
        Merge level s sorts blocks of 2**s keys, descending where bit s of the position is 0 and
        ascending where it is 1: those blocks are complemented (~key reverses the int64 order)
        before the level and restored after it, so every stage is the same descending half-cleaner.
        The levels are a runtime loop and each runs the stages 2**(s-1), ..., 2, 1 apart: the
        LOG_N distinct stages are emitted once each, guarded by `i < s`, instead of unrolling all
        LOG_N*(LOG_N+1)/2 of them (78 at LOG_N = 12): the same compare-exchanges in the same
        order, a several times smaller and faster compile."""
        for s in range(1, LOG_N + 1):
            flip = -((pos >> s) & 1).to(tl.int64)   # all ones in ascending blocks
            keys = keys ^ flip
            for i in tl.static_range(LOG_N - 1, -1, -1):
                if i < s:
                    keys = _half_cleaner(keys, i, LOG_N)
            keys = keys ^ flip
        return keys

    @triton.jit
    def _lane_mean_chunk(f_row, stride_fk, stride_fs, K, S, offs_s, S_CHUNK: tl.constexpr):
        """The float64 channel mean [S_CHUNK] of one batch row of f at positions offs_s (0 past
        S), in papr_core.h's channel_sum order: row j of a [LANES, S_CHUNK] tile is lane j
        (channels j, j + 16, ... in order), then the lanes are added in order (each masked sum
        adds one value and zeros: exact), then / K. The CPU and CUDA kernels do the same
        additions. (A bounded tile: one [16, S] tile spilled at S >= 144.)"""
        offs_k = tl.arange(0, LANES_C)
        f_pos = offs_s.to(tl.int64)[None, :] * stride_fs
        acc = tl.zeros((LANES_C, S_CHUNK), dtype=tl.float64)
        for k0 in range(0, K, LANES_C):
            kk = k0 + offs_k
            mask = (kk[:, None] < K) & (offs_s[None, :] < S)
            ptrs = f_row + kk[:, None].to(tl.int64) * stride_fk + f_pos
            acc += widen(tl.load(ptrs, mask=mask, other=0.0)).to(tl.float64)
        total = tl.zeros((S_CHUNK,), dtype=tl.float64)
        for lane in tl.static_range(LANES_C):
            total += tl.sum(tl.where(offs_k[:, None] == lane, acc, 0.0), axis=0)
        return total / K

    @triton.jit
    def _lane_mean(f_row, stride_fk, stride_fs, K, S, BLOCK_S: tl.constexpr,
                   S_CHUNK: tl.constexpr):
        """The whole row's mean [BLOCK_S]: the chunks' means merged into a [S / S_CHUNK,
        S_CHUNK] tile, as the forward merges keys."""
        NSCHUNK: tl.constexpr = BLOCK_S // S_CHUNK
        srow = tl.arange(0, NSCHUNK)[:, None]
        m2 = tl.zeros((NSCHUNK, S_CHUNK), dtype=tl.float64)
        for sc in range(NSCHUNK):
            offs_s = sc * S_CHUNK + tl.arange(0, S_CHUNK)
            chunk = _lane_mean_chunk(f_row, stride_fk, stride_fs, K, S, offs_s, S_CHUNK)
            m2 = tl.where(srow == sc, chunk[None, :], m2)
        return tl.reshape(m2, (BLOCK_S,))

    @triton.jit
    def _channel_mean_kernel(f_ptr, out_ptr, stride_fb, stride_fk, stride_fs, K, S,
                             S_CHUNK: tl.constexpr):
        """channel_mean: one program per batch row, out (B, S) float64, chunk by chunk (a loop
        to S, not to a constexpr bound: with the latter triton 3.6 spilled 8 B at S >= 144)."""
        b = tl.program_id(0).to(tl.int64)
        for s0 in range(0, S, S_CHUNK):
            offs_s = s0 + tl.arange(0, S_CHUNK)
            m = _lane_mean_chunk(f_ptr + b * stride_fb, stride_fk, stride_fs, K, S, offs_s,
                                 S_CHUNK)
            tl.store(out_ptr + b * S + offs_s, m, mask=offs_s < S)

    @triton.jit
    def _prune_fwd_kernel(
        x_ptr, f_ptr, out_ptr, idx_ptr,
        stride_xb, stride_xn, stride_xc, stride_fb, stride_fk, stride_fs,
        C, K, S, N, P, KEEP,
        in_t, in_h, in_w, out_t, out_h, out_w,
        st_hi_bits, st_lo_bits, sh_hi_bits, sh_lo_bits, sw_hi_bits, sw_lo_bits,
        rows_per_prog, chans_per_prog,
        SPATIAL: tl.constexpr, ALIGN: tl.constexpr, VIDEO: tl.constexpr,
        BLOCK_S: tl.constexpr, S_CHUNK: tl.constexpr, LOG_N: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHUNK: tl.constexpr,
    ):
        NP2: tl.constexpr = 1 << LOG_N
        b = tl.program_id(0).to(tl.int64)
        pid_r = tl.program_id(1)
        pid_c = tl.program_id(2)

        # 1. channel mean of f[b] over the S source positions (float64, channel_sum's order)
        m = _lane_mean(f_ptr + b * stride_fb, stride_fk, stride_fs, K, S, BLOCK_S, S_CHUNK)

        # 2. + 3. resize to the patch grid in float64, CHUNK patches at a time (a runtime loop:
        # only one chunk's float64 temporaries are live), each score rounded ONCE to float32
        # (SPEC), then SPEC's total order as packed keys, assembled into a [NCHUNK, CHUNK] tile
        # (padding keys sort last); patch p = (ot, oy, ox) row-major
        NCHUNK: tl.constexpr = NP2 // CHUNK
        crow = tl.arange(0, NCHUNK)[:, None]
        keys2 = tl.full((NCHUNK, CHUNK), _INT64_MIN_C, tl.int64)
        for ci in range(NCHUNK):
            pk = ci * CHUNK + tl.arange(0, CHUNK)
            key = _score_keys(m, pk, N, in_t, in_h, in_w, out_t, out_h, out_w,
                              _as_double(st_hi_bits), _as_double(st_lo_bits),
                              _as_double(sh_hi_bits), _as_double(sh_lo_bits),
                              _as_double(sw_hi_bits), _as_double(sw_lo_bits), ALIGN, VIDEO)
            keys2 = tl.where(crow == ci, key[None, :], keys2)
        p = tl.arange(0, NP2)
        keys = tl.reshape(keys2, (NP2,))
        # One copy of the network, run once (score order) or twice (order="spatial": the second
        # pass sorts the k kept indices ascending as a descending sort of their complements ~i,
        # padded with ~(2^31 - 1) so padding sorts last). The complementing step runs after both
        # passes, with no iteration flag (a predicate held across the network gets spilled): on
        # the second pass's output (~i for rank < k, then padding) it is the identity.
        NPASS: tl.constexpr = 2 if SPATIAL else 1
        for it in range(NPASS):
            keys = _bitonic_sort(keys, p, LOG_N)
            if SPATIAL:
                ranked = (0x7FFFFFFF - (keys & 0x7FFFFFFF)).to(tl.int32)  # patch index by rank
                keys = ~tl.where(p < KEEP, ranked, 0x7FFFFFFF).to(tl.int64)
        if SPATIAL:
            ranked = (~keys).to(tl.int32)
        else:
            ranked = (0x7FFFFFFF - (keys & 0x7FFFFFFF)).to(tl.int32)  # patch index by rank

        # 4. this program's output rows x channels
        row_lo = pid_r * rows_per_prog
        row_hi = tl.minimum(row_lo + rows_per_prog, P + KEEP)
        c_lo = pid_c * chans_per_prog
        c_hi = tl.minimum(c_lo + chans_per_prog, C)
        offs_r = tl.arange(0, BLOCK_R)
        offs_c = tl.arange(0, BLOCK_C)
        x_row = x_ptr + b * stride_xb
        out_row = out_ptr + b * (P + KEEP) * C
        for r0 in range(row_lo, row_hi, BLOCK_R):
            r = r0 + offs_r
            rmask = r < row_hi
            j = tl.minimum(tl.maximum(r - P, 0), NP2 - 1)
            patch = tl.gather(ranked, j, 0)
            src = tl.where(r < P, r, P + patch).to(tl.int64)
            src = tl.where(rmask, src, 0)
            if pid_c == 0:
                tl.store(idx_ptr + b * KEEP + (r - P), patch.to(tl.int64), mask=rmask & (r >= P))
            for c0 in range(c_lo, c_hi, BLOCK_C):
                c = c0 + offs_c
                mask = rmask[:, None] & (c[None, :] < c_hi)
                vals = tl.load(x_row + src[:, None] * stride_xn + c[None, :].to(tl.int64) * stride_xc,
                               mask=mask)
                tl.store(out_row + r[:, None].to(tl.int64) * C + c[None, :], vals, mask=mask)

    @triton.jit
    def _prune_bwd_kernel(
        g_ptr, idx_ptr, gx_ptr,
        stride_gb, stride_gn, stride_gc,
        C, NT, P, KEEP,
        toks_per_prog, chans_per_prog,
        BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        pid_t = tl.program_id(1)
        pid_c = tl.program_id(2)
        t_lo = pid_t * toks_per_prog
        t_hi = tl.minimum(t_lo + toks_per_prog, NT)
        c_lo = pid_c * chans_per_prog
        c_hi = tl.minimum(c_lo + chans_per_prog, C)
        offs_t = tl.arange(0, BLOCK_T)
        offs_j = tl.arange(0, BLOCK_J)
        offs_c = tl.arange(0, BLOCK_C)
        g_row = g_ptr + b * stride_gb
        gx_row = gx_ptr + b * NT * C
        for t0 in range(t_lo, t_hi, BLOCK_T):
            t = t0 + offs_t
            tmask = t < t_hi
            patch = t - P
            # output row of each token: prefix rows map to themselves, kept patches to P + j.
            # Only in-range indices of in-range j count, and a patch found more than once
            # (duplicate indices, outside the contract) is treated as pruned, so P + pos is
            # always a row of grad_out whatever the indices hold.
            pos = tl.zeros((BLOCK_T,), dtype=tl.int32)
            hits = tl.zeros((BLOCK_T,), dtype=tl.int32)
            for j0 in range(0, KEEP, BLOCK_J):
                j = j0 + offs_j
                kept = tl.load(idx_ptr + b * KEEP + j, mask=j < KEEP, other=-1)
                kept = tl.where((kept >= 0) & (kept < NT - P), kept, -1).to(tl.int32)
                hit = (kept[None, :] == patch[:, None]) & (patch[:, None] >= 0)
                pos += tl.sum(tl.where(hit, j[None, :], 0), axis=1)
                hits += tl.sum(hit.to(tl.int32), axis=1)
            found = (t < P) | (hits == 1)
            src = tl.where(t < P, t, P + tl.where(hits == 1, pos, 0)).to(tl.int64)
            src = tl.where(tmask & found, src, 0)
            for c0 in range(c_lo, c_hi, BLOCK_C):
                c = c0 + offs_c
                cmask = c[None, :] < c_hi
                vals = tl.load(g_row + src[:, None] * stride_gn + c[None, :].to(tl.int64) * stride_gc,
                               mask=(tmask & found)[:, None] & cmask, other=0.0)
                tl.store(gx_row + t[:, None].to(tl.int64) * C + c[None, :], vals,
                         mask=tmask[:, None] & cmask)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
# Tests force several programs per batch row on tiny shapes through common.SPLIT_OVERRIDE.
BLOCK_R = 16
BLOCK_C = 128
BLOCK_T = 16
BLOCK_J = 128
# Patches scored per iteration of the forward's float64 loop (default: one per thread, 32 *
# num_warps, capped at the padded N). Tests set it small to run many chunks on tiny shapes.
CHUNK_OVERRIDE: Optional[int] = None


def _scale(size_in: int, size_out: int, align_corners: bool) -> float:
    """ATen's area_pixel_compute_scale<double> (interpolate with size=, no scale_factor): a
    Python float is that double."""
    if align_corners:
        return (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    return size_in / size_out


def _split_bits(value: float) -> Tuple[int, int]:
    """`value` as hi + lo (Veltkamp: 26 and 27 significant bits, exact), each as its int64 bits:
    the kernel's products of either part with o + 0.5 are exact (see _src_index)."""
    c = 134217729.0 * value          # 2**27 + 1
    hi = c - (c - value)
    return _double_bits(hi), _double_bits(value - hi)


def _double_bits(value: float) -> int:
    """The int64 bit pattern of a float64: the kernel reads it back with a bitcast (a Python
    float argument would reach the kernel as fp32)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def fwd_constexprs(num_patches: int, source: int, video: bool, align: bool, spatial: bool,
                   interpreted: bool = False):
    """The compile-time parameters of the forward kernel for a problem (also used by gpu-report)."""
    block_s = next_pow2(source)
    log_n = max(1, (num_patches - 1).bit_length())
    chunk = CHUNK_OVERRIDE or 32 * fwd_num_warps(num_patches)   # one float64 score per thread
    return dict(SPATIAL=spatial, ALIGN=align, VIDEO=video, BLOCK_S=block_s,
                S_CHUNK=min(block_s, S_CHUNK), LOG_N=log_n, CHUNK=min(1 << log_n, chunk),
                BLOCK_R=256 if interpreted else BLOCK_R, BLOCK_C=BLOCK_C)


def mean_constexprs(source: int) -> dict:
    """The compile-time parameters of the channel_mean kernel (also used by gpu-report)."""
    return dict(S_CHUNK=min(next_pow2(source), S_CHUNK))


def fwd_num_warps(num_patches: int) -> int:
    """More warps for bigger sorts: the 2**LOG_N int64 keys live in registers."""
    size = next_pow2(num_patches)
    return 4 if size <= 512 else 8 if size <= 2048 else 16


def bwd_constexprs(interpreted: bool = False):
    return dict(BLOCK_T=256 if interpreted else BLOCK_T, BLOCK_J=1024 if interpreted else BLOCK_J,
                BLOCK_C=BLOCK_C)


def fallback_backend(device_type: str):
    """The backend module that runs shapes outside the kernel's limits: the fastest other backend
    that can run on `device_type` (registration order is the preference order)."""
    name = next(n for n in backends.available(device_type) + ["torch"] if n != "triton")
    return backends.resolve(name, device_type)


def fallback_reason(f: torch.Tensor, num_patches: int = 0) -> Optional[str]:
    """Why f (and num_patches, when given) are beyond the kernels' register budget, else None."""
    source = math.prod(f.shape[2:])
    if source > MAX_SOURCE:
        return f"f has {source} spatial positions, more than the kernel's {MAX_SOURCE}"
    if num_patches > MAX_PATCHES:
        return f"{num_patches} patches is more than the kernel's {MAX_PATCHES}"
    return None


@functools.lru_cache(maxsize=256)
def _forward_launch(batch: int, num_tokens: int, channels: int, num_prefix_tokens: int,
                    keep: int, f_shape: Tuple[int, ...], grid: Tuple[int, ...],
                    align_corners: bool, spatial: bool, device: torch.device, overrides: tuple):
    """(launch grid, the kernel's scalar arguments after the strides, num_warps, constexprs) of a
    forward problem: computed once per signature (the scales' bit splitting, the split over SMs
    and the constexprs cost ~10 us of Python a call). `overrides`: the test overrides in force."""
    P, N, K = num_prefix_tokens, num_tokens - num_prefix_tokens, f_shape[0]
    video = len(f_shape) == 4
    src = tuple(f_shape[1:]) if video else (1,) + tuple(f_shape[1:])
    dst = tuple(grid) if video else (1,) + tuple(grid)
    scales = [bits for i, o in zip(src, dst) for bits in _split_bits(_scale(i, o, align_corners))]
    rows = P + keep
    row_chunks, chan_chunks = common.split(batch, rows, channels, BLOCK_R, BLOCK_C,
                                           common.multiprocessors(device))
    rows_per = -(-rows // row_chunks)
    chans_per = -(-channels // chan_chunks)
    meta = fwd_constexprs(N, math.prod(src), video, align_corners, spatial,
                          common.interpreted(device))
    meta.update(common.no_fp_fusion(device))   # the float64 scores: cpp's and cuda's operations
    scalars = (channels, K, math.prod(src), N, P, keep, *src, *dst, *scales, rows_per, chans_per)
    return (batch, -(-rows // rows_per), -(-channels // chans_per)), scalars, \
        fwd_num_warps(N), meta


def flat_strides(f: torch.Tensor) -> Optional[Tuple[int, int, int]]:
    """(batch, channel, position) strides of f seen as (B, K, S), S its spatial dims flattened
    row-major, when they are one strided dimension: contiguous f (position stride 1) and
    channels_last / channels_last_3d f from a proposal network (channel stride 1, position stride
    K) are read as they are, without a copy; None otherwise (the launcher copies)."""
    position = None
    for size, stride in zip(reversed(f.shape[2:]), reversed(f.stride()[2:])):
        if size == 1:
            continue
        if position is None:
            position, expected = stride, stride * size
        elif stride != expected:
            return None
        else:
            expected *= size
    return f.stride(0), f.stride(1), 1 if position is None else position


def _readable(f: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """(f, its flat_strides), f copied to contiguous only when its positions are no single
    strided dimension."""
    strides = flat_strides(f)
    if strides is None:
        f = f.contiguous()
        strides = flat_strides(f)
    return f, strides


def _launch_forward(x: torch.Tensor, f: torch.Tensor, num_prefix_tokens: int, grid: List[int],
                    keep: int, align_corners: bool, spatial: bool):
    batch, n, channels = x.shape
    out = torch.empty(batch, num_prefix_tokens + keep, channels, dtype=x.dtype, device=x.device)
    indices = torch.empty(batch, keep, dtype=torch.int64, device=x.device)
    if batch == 0:
        return out, indices
    f, f_strides = _readable(f)
    launch, scalars, num_warps, meta = _forward_launch(
        batch, n, channels, num_prefix_tokens, keep, tuple(f.shape[1:]), tuple(grid),
        align_corners, spatial, x.device, (CHUNK_OVERRIDE, common.SPLIT_OVERRIDE))
    with launch_guard(x.device):
        _prune_fwd_kernel[launch](x, f, out, indices, x.stride(0), x.stride(1), x.stride(2),
                                  *f_strides, *scalars, num_warps=num_warps, **meta)
    return out, indices


def _launch_channel_mean(f: torch.Tensor) -> torch.Tensor:
    out = torch.empty((f.shape[0], 1, *f.shape[2:]), dtype=torch.float64, device=f.device)
    source = math.prod(f.shape[2:])
    if f.shape[0] == 0 or source == 0:
        return out
    f, f_strides = _readable(f)
    with launch_guard(f.device):
        _channel_mean_kernel[(f.shape[0],)](f, out, *f_strides, f.shape[1], source,
                                            num_warps=MEAN_WARPS, **mean_constexprs(source))
    return out


def _launch_backward(grad_out: torch.Tensor, indices: torch.Tensor, num_tokens: int,
                     num_prefix_tokens: int):
    batch, rows, channels = grad_out.shape
    keep = indices.shape[1]
    if (indices.dim() != 2 or indices.shape[0] != batch or rows != num_prefix_tokens + keep
            or not 0 <= num_prefix_tokens <= num_tokens or indices.dtype != torch.int64):
        raise ValueError(
            f"triton_prune_backward: grad_out (B, P + k, C) = {tuple(grad_out.shape)} and "
            f"int64 indices (B, k) = {tuple(indices.shape)} {indices.dtype} do not match "
            f"num_tokens={num_tokens}, num_prefix_tokens={num_prefix_tokens}")
    grad_x = torch.empty(batch, num_tokens, channels, dtype=grad_out.dtype, device=grad_out.device)
    if batch == 0:
        return grad_x
    indices = indices.contiguous()
    tok_chunks, chan_chunks = common.split(batch, num_tokens, channels, BLOCK_T, BLOCK_C,
                                           common.multiprocessors(grad_out.device))
    toks_per = -(-num_tokens // tok_chunks)
    chans_per = -(-channels // chan_chunks)
    with launch_guard(grad_out.device):
        _prune_bwd_kernel[(batch, -(-num_tokens // toks_per), -(-channels // chans_per))](
            grad_out, indices, grad_x, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            channels, num_tokens, num_prefix_tokens, keep, toks_per, chans_per,
            **bwd_constexprs(common.interpreted(grad_out.device)))
    return grad_x


# ----------------------------------------------------------------------------------------------
# torch.library wrapping: opaque custom ops with fake implementations (no graph break)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("papr_kernels::triton_prune_forward", mutates_args=())
def triton_prune_forward(x: torch.Tensor, f: torch.Tensor, num_prefix_tokens: int,
                         grid: List[int], keep: int, align_corners: bool,
                         spatial: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(x, f, num_prefix_tokens, grid, keep, align_corners, spatial)


@triton_prune_forward.register_fake
def _(x, f, num_prefix_tokens, grid, keep, align_corners, spatial):
    batch, _, channels = x.shape
    return (x.new_empty(batch, num_prefix_tokens + keep, channels),
            x.new_empty(batch, keep, dtype=torch.int64))


@torch.library.custom_op("papr_kernels::triton_prune_backward", mutates_args=())
def triton_prune_backward(grad_out: torch.Tensor, indices: torch.Tensor, num_tokens: int,
                          num_prefix_tokens: int) -> torch.Tensor:
    return _launch_backward(grad_out, indices, num_tokens, num_prefix_tokens)


@triton_prune_backward.register_fake
def _(grad_out, indices, num_tokens, num_prefix_tokens):
    return grad_out.new_empty(grad_out.shape[0], num_tokens, grad_out.shape[2])


@torch.library.custom_op("papr_kernels::triton_channel_mean", mutates_args=())
def triton_channel_mean(f: torch.Tensor) -> torch.Tensor:
    return _launch_channel_mean(f)


@triton_channel_mean.register_fake
def _(f):
    return f.new_empty((f.shape[0], 1, *f.shape[2:]), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Backend interface (papr_kernels.backends)
# ----------------------------------------------------------------------------------------------
def forward(x: torch.Tensor, f: torch.Tensor, plan):
    if fallback_reason(f, plan.num_patches) is not None:
        return fallback_backend(x.device.type).forward(x, f, plan)
    return common.call(triton_prune_forward, _launch_forward, x, f, plan.num_prefix_tokens,
                       list(plan.grid), plan.keep, plan.align_corners, plan.order == "spatial")


def backward(grad_out: torch.Tensor, indices: torch.Tensor, plan):
    if plan.num_patches > MAX_PATCHES:   # the compare-per-token backward is O(N * k): hand over
        return fallback_backend(grad_out.device.type).backward(grad_out, indices, plan)
    return common.call(triton_prune_backward, _launch_backward, grad_out, indices,
                       plan.num_tokens, plan.num_prefix_tokens)


def channel_mean(f: torch.Tensor) -> torch.Tensor:
    """f's float64 channel mean (B, 1, *spatial) in the compiled backends' summation order."""
    if fallback_reason(f) is not None:
        return fallback_backend(f.device.type).channel_mean(f)
    return common.call(triton_channel_mean, _launch_channel_mean, f)
