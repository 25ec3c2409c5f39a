# Paged decode attention in Triton: one new query token per sequence against that sequence's own KV blocks.
#
# Contract: paged_attention_triton(q [B, H, D], k_pool [NB, P, KVH, D], v_pool [NB, P, KVH, D],
#   block_table [B, W] int32, lengths [B] int32, max_length: int) -> out [B, H, D] in q's dtype, with
#   out[b, h] = softmax(q[b, h] . K_b^T / sqrt(D)) V_b over the keys at positions 0..lengths[b]-1 of sequence b,
#   position t living in block block_table[b, t // P] at offset t % P. Query head h reads kv head h // (H // KVH)
#   (transformers' repeat_kv order). Needs 1 <= lengths[b] <= max_length; P a power of two >= 16;
#   H a multiple of KVH; the last dimension of q and of the pools contiguous. q and the pools share one dtype
#   (bf16, fp16 or fp32) and live on a CUDA device, or on the CPU under TRITON_INTERPRET=1 (tests only).
#   Table entries past a sequence's last block, and keys past its length inside that block, are never read.
#   No host sync and shapes fixed by (B, H, D, max_length): safe inside a CUDA graph.
# Split pass: program (b, kv head, split) owns the query heads of one kv head (GQA: the group's rows form the
#   M dimension of both dots, padded to 16, so each key and value tile is loaded once for the whole group) and
#   SPLIT_KEYS consecutive keys; it walks them in tiles of tile_keys() keys (one block-table entry per tile) with an
#   online softmax in fp32 and stores its unnormalised output, running max and sum-exp. Programs whose split
#   starts past the sequence's length exit at once, so a sequence costs ceil(length / tile) tiles of work
#   however long the longest one in the batch is.
# Merge pass: program (b, kv head) rescales the splits that hold keys to their common max (log-sum-exp) and
#   writes the normalised output. Splitting bounds the keys one program reads, so one long sequence in a
#   batch of short ones no longer sets the step time.
# Limits: no causal mask within the new tokens (one query per sequence); lengths of 0 give NaN.
import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SPLIT_KEYS = 512  # keys per split program: long enough to amortise the merge, short enough to spread a long tail
NUM_STAGES = 3  # sm_90 build (triton 3.9): no register spills for bf16/fp16/fp32 at head_dim 64 and 128
LOG2E = 1.4426950408889634


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, o_ptr, ml_ptr, scale_log2,
                  stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                  stride_tb, stride_ob, stride_oh, stride_os, stride_mb, stride_mh, stride_ms,
                  G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISION: tl.constexpr):
    b, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(len_ptr + b)
    start = split * SPLIT
    if start < length:
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_ok, d_ok = g < G, d < D
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        end = tl.minimum(start + SPLIT, length)
        for t0 in range(start, end, BLOCK_N):
            page = tl.load(table_ptr + b.to(tl.int64) * stride_tb + t0 // PAGE).to(tl.int64)
            offs = t0 % PAGE + tl.arange(0, BLOCK_N)  # a tile never straddles two blocks: BLOCK_N divides PAGE
            ok = t0 + tl.arange(0, BLOCK_N) < length
            kv_mask = ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + page * stride_kb + offs[:, None] * stride_kt + h * stride_kh + d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + page * stride_vb + offs[:, None] * stride_vt + h * stride_vh + d[None, :],
                        mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # log2 domain: exp2 below
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile holds at least one key
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        o_ptrs = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + split * stride_os
        tl.store(o_ptrs + g[:, None] * BLOCK_D + d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
        ml_ptrs = ml_ptr + b.to(tl.int64) * stride_mb + h * stride_mh + split * stride_ms + g * 2
        tl.store(ml_ptrs, m, mask=g_ok)
        tl.store(ml_ptrs + 1, l, mask=g_ok)


@triton.jit
def _merge_kernel(o_ptr, ml_ptr, len_ptr, out_ptr, stride_ob, stride_oh, stride_os, stride_mb, stride_mh,
                  stride_ms, stride_yb, stride_yh,
                  G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  SPLIT: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok, d_ok = g < G, d < D
    n_splits = tl.cdiv(tl.load(len_ptr + b), SPLIT)  # only splits that held keys wrote partials
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + g[:, None] * BLOCK_D + d[None, :]
    ml_base = ml_ptr + b.to(tl.int64) * stride_mb + h * stride_mh + g * 2
    for s in range(0, n_splits):
        m_s = tl.load(ml_base + s * stride_ms, mask=g_ok, other=0.0)
        l_s = tl.load(ml_base + s * stride_ms + 1, mask=g_ok, other=1.0)  # padding rows: 0 / 1, not 0 / 0
        o_s = tl.load(o_base + s * stride_os, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m, m_s)
        a, c = tl.exp2(m - m_new), tl.exp2(m_s - m_new)
        l = l * a + l_s * c
        acc = acc * a[:, None] + o_s * c[:, None]
        m = m_new
    out = acc / l[:, None]
    y_ptrs = out_ptr + b.to(tl.int64) * stride_yb + (h * G + g)[:, None] * stride_yh + d[None, :]
    tl.store(y_ptrs, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def tile_keys(block_size: int, dtype) -> int:
    """Keys the split kernel reads per tile: a sequence of length L costs ceil(L / tile) * tile key reads. 64, but 32
    for fp32 (its dots are FMAs, not tensor-core ops, and 64 spills registers at head_dim 128 on sm_90)."""
    return min(32 if dtype == torch.float32 else 64, block_size)


def launch_constants(H, D, kv_heads, block_size, dtype):
    """The split kernel's compile-time constants for these shapes (the sm_90 build check uses them too)."""
    return dict(G=H // kv_heads, BLOCK_G=max(16, triton.next_power_of_2(H // kv_heads)), D=D,
                BLOCK_D=max(16, triton.next_power_of_2(D)), PAGE=block_size, BLOCK_N=tile_keys(block_size, dtype),
                SPLIT=SPLIT_KEYS)


def paged_attention_triton(q, k_pool, v_pool, block_table, lengths, max_length):
    B, H, D = q.shape
    kvh = k_pool.shape[2]
    c = launch_constants(H, D, kvh, k_pool.shape[1], q.dtype)
    assert SPLIT_KEYS % c["BLOCK_N"] == 0, "a split must hold whole tiles"
    splits = triton.cdiv(max_length, SPLIT_KEYS)
    partial = torch.empty(B, kvh, splits, c["BLOCK_G"], c["BLOCK_D"], device=q.device, dtype=torch.float32)
    ml = torch.empty(B, kvh, splits, c["BLOCK_G"], 2, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32: exact dots; bf16/fp16 go to tensor cores
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():  # Triton launches on the current device
        _split_kernel[(B, kvh, splits)](
            q, k_pool, v_pool, block_table, lengths, partial, ml, LOG2E / D ** 0.5,
            q.stride(0), q.stride(1), *k_pool.stride()[:3], *v_pool.stride()[:3], block_table.stride(0),
            *partial.stride()[:3], *ml.stride()[:3], UPCAST=INTERPRET, PRECISION=precision,
            num_warps=4, num_stages=NUM_STAGES, **c)
        _merge_kernel[(B, kvh)](
            partial, ml, lengths, out, *partial.stride()[:3], *ml.stride()[:3], out.stride(0), out.stride(1),
            G=c["G"], BLOCK_G=c["BLOCK_G"], D=D, BLOCK_D=c["BLOCK_D"], SPLIT=SPLIT_KEYS, num_warps=4)
    return out
