# Fused LM head -> per-token log-probability and entropy, in Triton.
#
# Contract: linear_logprobs_triton(hidden [N, d], weight [V, d], targets [N] int, temperature, vocab_size)
#   -> (logprobs [N] fp32, entropy [N] fp32), with z = hidden @ weight[:vocab_size].T / temperature,
#   logprobs = z[target] - logsumexp(z), entropy = -sum p log p. Differentiable w.r.t. hidden and weight.
#   hidden and weight share one dtype (bf16, fp16 or fp32) and live on a CUDA device, or on the CPU under
#   TRITON_INTERPRET=1 (tests only: slow). Any N, d, V; strided hidden/weight are fine.
# Forward: each program owns BLOCK_N tokens and VOCAB_PER_PROGRAM vocabulary rows; it builds logit tiles on
#   chip (K loop over d) and keeps an online (max m, sum-exp s, sum of exp(z-m)*(z-m) t, target logit) per
#   token. The logits never reach device memory; the per-program partials (16 B per token per vocabulary
#   split) are merged in PyTorch. Backward keeps per token the max logit, log sum-exp below it and the entropy (12 B).
# Backward: per vocabulary chunk, a kernel recomputes the logit tiles and writes the logit gradient dz for
#   that chunk (at most DZ_CHUNK_ELEMENTS values, in the input dtype); two tensor-core matmuls then give
#   d_weight[chunk] = dz^T @ hidden (each weight row written once) and d_hidden += dz @ weight[chunk]
#   (fp32 accumulator). A fully fused backward would instead need atomics on both outputs for every
#   (token tile, vocab tile) pair -- N*V*d/BLOCK floats of atomic traffic -- which is why it is not done here.
# Limits: targets must lie in [0, vocab_size); an out-of-range target yields logprob -inf (never matched).
#   In interpreter mode one small autotune config is used and dots run in fp32 (bf16 arithmetic is wrong
#   there); on the GPU bf16 operands go to the tensor cores and fp32 operands use exact ("ieee") dots.
import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
VOCAB_PER_PROGRAM = 4096  # vocabulary rows per forward program: enough tiles to amortise, enough programs to fill the GPU
DZ_CHUNK_ELEMENTS = 2**27  # backward's logit-gradient buffer: 256 MiB in bf16, whatever N is

if INTERPRET:  # the interpreter's autotuner cannot benchmark: exactly one config
    _CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_V": 128, "BLOCK_D": 16, "GROUP_N": 2}, num_warps=4, num_stages=1)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_D": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64, "GROUP_N": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64, "GROUP_N": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_D": 64, "GROUP_N": 8}, num_warps=4, num_stages=4),
        # fp32 inputs need twice the shared memory per stage; the autotuner skips configs that do not fit
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32, "GROUP_N": 8}, num_warps=4, num_stages=2),
    ]


@triton.jit
def _grouped(pid, n_row_blocks, n_cols, GROUP: tl.constexpr):
    # Consecutive programs walk GROUP token blocks down one vocabulary column, so the programs running at the
    # same time share their weight tiles and hidden rows in L2 (the swizzle of Triton's matmul tutorial).
    per_group = GROUP * n_cols
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_row_blocks - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    """hidden[rows] @ weight[cols].T as a [BLOCK_N, BLOCK_V] fp32 tile; masked rows/cols give 0."""
    ks = tl.arange(0, BLOCK_D)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hn + ks[None, :] * stride_hd
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wv + ks[:, None] * stride_wd
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        k_ok = d0 + ks < D
        h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_D * stride_hd
        w_ptrs += BLOCK_D * stride_wd
    return acc


@triton.autotune(configs=_CONFIGS, key=["D", "n_bucket"])
@triton.jit
def _forward_kernel(h_ptr, w_ptr, y_ptr, m_ptr, s_ptr, t_ptr, zy_ptr, N, V, D, n_bucket,
                    stride_hn, stride_hd, stride_wv, stride_wd, inv_temperature, vocab_per_program,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    pid_n, split = _grouped(tl.program_id(0), n_row_blocks, tl.cdiv(V, vocab_per_program), GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    v_start = split * vocab_per_program
    v_end = tl.minimum(v_start + vocab_per_program, V)
    # m starts finite so that the first rescale multiplies s = 0 by a finite number instead of -inf.
    m = tl.full([BLOCK_N], -3.0e38, dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum exp(z - m)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum exp(z - m) * (z - m): entropy = log s - t / s, no cancellation
    zy = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd,
                        BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION) * inv_temperature
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        shifted = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)
        t = alpha * (t + (m - m_new) * s) + tl.sum(e * shifted, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        zy = tl.maximum(zy, tl.max(tl.where(cols[None, :] == y[:, None], z, float("-inf")), axis=1))
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(t_ptr + out, t, mask=row_ok)
    tl.store(zy_ptr + out, zy, mask=row_ok)


@triton.autotune(configs=_CONFIGS, key=["D", "n_bucket"])
@triton.jit
def _backward_kernel(h_ptr, w_ptr, y_ptr, m_ptr, log_s_ptr, ent_ptr, g_lp_ptr, g_ent_ptr, dz_ptr, N, V, D, n_bucket,
                     v_offset,
                     stride_hn, stride_hd, stride_wv, stride_wd, stride_dzn, inv_temperature,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # V rows of weight starting at vocabulary id v_offset; dz is [N, V] with row stride stride_dzn.
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd,
                    BLOCK_N, BLOCK_V, BLOCK_D, UPCAST, PRECISION) * inv_temperature
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
    log_s = tl.load(log_s_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(g_lp_ptr + rows, mask=row_ok, other=0.0)
    g_ent = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
    # d logprob / dz_j = 1[j = y] - p_j;  d entropy / dz_j = -p_j (z_j - E_p[z]) = -p_j (log p_j + entropy).
    logp = (z - m[:, None]) - log_s[:, None]
    p = tl.exp(logp)
    dz = tl.where(v_offset + cols[None, :] == y[:, None], g_lp[:, None], 0.0)
    dz -= p * (g_lp[:, None] + g_ent[:, None] * (logp + ent[:, None]))
    dz *= inv_temperature  # z = logits / temperature
    dz_ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dzn + cols[None, :]
    tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _n_bucket(n):
    # Part of the autotune key, so that the config picked for a small first call is not reused at N = 32k.
    return min(triton.next_power_of_2(max(n, 1)), 65536)


def _on_device(t):
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


def _precision(hidden):
    return "ieee" if hidden.dtype == torch.float32 else "tf32"  # fp32 operands: exact dots, not tf32; else unused


def _forward(hidden, weight, targets, temperature, vocab_size):
    n, d = hidden.shape
    splits = triton.cdiv(vocab_size, VOCAB_PER_PROGRAM)
    m, s, t, zy = torch.empty(4, splits, n, device=hidden.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * splits,)
    with _on_device(hidden):
        _forward_kernel[grid](hidden, weight, targets, m, s, t, zy, n, vocab_size, d, _n_bucket(n), *hidden.stride(),
                              *weight.stride(), 1.0 / temperature, VOCAB_PER_PROGRAM, UPCAST=INTERPRET,
                              PRECISION=_precision(hidden))
    # Merge the vocabulary splits: rescale each split's sums to the global max.
    m_all = m.amax(0)
    scale = torch.exp(m - m_all)
    s_all = (scale * s).sum(0)
    t_all = (scale * (t + (m - m_all) * s)).sum(0)
    log_s = s_all.log()
    # log p = (z - m) - log s, never z - logsumexp: at |z| ~ 100 the rounding of a stored logsumexp shifts every
    # log p alike, and the gradient's rows then no longer sum to zero.
    return (zy.amax(0) - m_all) - log_s, log_s - t_all / s_all, m_all, log_s


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, vocab_size):
        logprobs, entropy, m, log_s = _forward(hidden, weight, targets, temperature, vocab_size)
        ctx.save_for_backward(hidden, weight, targets, m, log_s, entropy)
        ctx.temperature, ctx.vocab_size = temperature, vocab_size
        return logprobs, entropy

    @staticmethod
    def backward(ctx, g_logprobs, g_entropy):
        hidden, weight, targets, m, log_s, entropy = ctx.saved_tensors
        n, d = hidden.shape
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        d_hidden = torch.zeros(n, d, device=hidden.device, dtype=torch.float32) if need_hidden else None
        d_weight = torch.zeros_like(weight) if need_weight else None  # rows >= vocab_size stay zero
        chunk = min(ctx.vocab_size, max(256, DZ_CHUNK_ELEMENTS // max(n, 1)))
        dz_buffer = torch.empty(n, chunk, device=hidden.device, dtype=hidden.dtype)
        g_logprobs, g_entropy = g_logprobs.contiguous(), g_entropy.contiguous()  # sum().backward() gives stride 0
        for v0 in range(0, ctx.vocab_size, chunk):
            w = weight[v0:v0 + chunk][:ctx.vocab_size - v0]
            dz = dz_buffer[:, :w.shape[0]]
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(w.shape[0], meta["BLOCK_V"]),)
            with _on_device(hidden):
                _backward_kernel[grid](hidden, w, targets, m, log_s, entropy, g_logprobs, g_entropy, dz, n, w.shape[0],
                                       d, _n_bucket(n), v0, *hidden.stride(), *w.stride(), dz.stride(0),
                                       1.0 / ctx.temperature, UPCAST=INTERPRET, PRECISION=_precision(hidden))
            if need_hidden:
                d_hidden += dz @ w
            if need_weight:
                torch.mm(dz.T, hidden, out=d_weight[v0:v0 + w.shape[0]])
        return (d_hidden.to(hidden.dtype) if need_hidden else None), d_weight, None, None, None


def linear_logprobs_triton(hidden, weight, targets, temperature=1.0, vocab_size=None):
    """Per-token log p(target) and entropy of softmax(hidden @ weight.T / temperature) over the first vocab_size
    rows, without materialising the logits (SPEC: policy log-probabilities and entropy of response tokens)."""
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    return _LinearLogprobs.apply(hidden, weight, targets.contiguous(), float(temperature), int(vocab_size))
