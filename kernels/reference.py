# Plain-PyTorch reference for kernels.fused_logprobs, and the path taken on the CPU.
#
# Contract: the same as linear_logprobs_triton -- (logprobs [N] fp32, entropy [N] fp32) of
#   softmax(hidden @ weight[:vocab_size].T / temperature), differentiable w.r.t. hidden and weight.
# Computes in fp32 whatever the input dtype. Chunked over tokens with activation checkpointing, so at most
#   REFERENCE_CHUNK_ELEMENTS logits (and a few temporaries of that size) exist at once, in forward and in
#   backward; the price is one fp32 copy of weight[:vocab_size] and recomputing each chunk's logits.
# Limits: targets must lie in [0, vocab_size) (out-of-range ids raise in gather).
import torch
from torch.utils.checkpoint import checkpoint

REFERENCE_CHUNK_ELEMENTS = 2**25  # 128 MiB of fp32 logits per chunk


def _chunk_logprobs(hidden, weight, targets, temperature):
    logp = torch.log_softmax(hidden.float() @ weight.T / temperature, dim=-1)
    return logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def linear_logprobs_reference(hidden, weight, targets, temperature=1.0, vocab_size=None):
    """Per-token log p(target) and entropy, chunked over tokens (SPEC: policy log-probabilities)."""
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    weight = weight[:vocab_size].float()  # rows >= vocab_size get no logit and hence a zero gradient
    chunk = max(1, REFERENCE_CHUNK_ELEMENTS // vocab_size)
    parts = [checkpoint(_chunk_logprobs, h, weight, y, temperature, use_reentrant=False)
             for h, y in zip(hidden.split(chunk), targets.split(chunk))]
    return torch.cat([lp for lp, _ in parts]), torch.cat([ent for _, ent in parts])
