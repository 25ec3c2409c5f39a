"""Fused LM head -> per-token log-probability and entropy (SPEC: policy log-probabilities of response tokens), and
paged decode attention for the sampler.

linear_logprobs runs the Triton kernels (kernels/fused_logprobs.py) on CUDA tensors and the chunked PyTorch
reference (kernels/reference.py) elsewhere, so a CPU run never touches the slow Triton interpreter; paged_decode
does the same with kernels/paged_attention.py and kernels/paged_reference.py.
"""
import torch

from . import fused_logprobs, paged_attention, paged_reference, reference


def linear_logprobs(hidden, weight, targets, temperature=1.0, vocab_size=None):
    """(logprobs, entropy), both fp32 [N], of softmax(hidden @ weight[:vocab_size].T / temperature).

    hidden [N, d] and weight [V, d] share a dtype (bf16, fp16 or fp32); targets [N] are token ids in
    [0, vocab_size). Rows of weight at or after vocab_size (padding of the LM head) are excluded and get a
    zero gradient. Differentiable w.r.t. hidden and weight (weight may be a tied embedding matrix).
    """
    vocab_size = weight.shape[0] if vocab_size is None else int(vocab_size)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_logprobs: need hidden [N, d] and weight [V, d], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}; flatten the batch with hidden.reshape(-1, d)")
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"linear_logprobs: need integer targets of shape [{hidden.shape[0]}], got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"linear_logprobs: hidden and weight must share a float dtype, got {hidden.dtype} and "
                         f"{weight.dtype}; cast hidden to weight.dtype")
    if not hidden.device == weight.device == targets.device:
        raise ValueError(f"linear_logprobs: hidden, weight and targets are on {hidden.device}, {weight.device}, "
                         f"{targets.device}; move them to one device")
    if not 0 < vocab_size <= weight.shape[0] or not temperature > 0:
        raise ValueError(f"linear_logprobs: need 0 < vocab_size <= {weight.shape[0]} and temperature > 0, got "
                         f"{vocab_size} and {temperature}")
    if hidden.is_cuda:  # no range check here: it would synchronise; out-of-range targets give logprob -inf
        return fused_logprobs.linear_logprobs_triton(hidden, weight, targets, temperature, vocab_size)
    if targets.numel() and not 0 <= int(targets.min()) <= int(targets.max()) < vocab_size:
        raise ValueError(f"linear_logprobs: targets must lie in [0, {vocab_size}), got "
                         f"[{int(targets.min())}, {int(targets.max())}]; mask padding before the call")
    return reference.linear_logprobs_reference(hidden, weight, targets, temperature, vocab_size)


def paged_decode(q, k_pool, v_pool, block_table, lengths, max_length):
    """Attention of one new query per sequence over its own KV blocks: out [B, H, D] in q's dtype.

    q [B, H, D]; k_pool, v_pool [num_blocks, block_size, kv_heads, D]; block_table [B, W] int32 (block of
    position t of sequence b: block_table[b, t // block_size]); lengths [B] int32 in [1, max_length] (keys per
    sequence, the new one included); max_length an int bound on lengths that fixes the launch shape, so that a
    CUDA graph can hold the call. No checks here: the sampler calls it in every layer of every decode step.
    """
    if q.is_cuda:
        return paged_attention.paged_attention_triton(q, k_pool, v_pool, block_table, lengths, max_length)
    return paged_reference.paged_attention_reference(q, k_pool, v_pool, block_table, lengths)
