# Plain-PyTorch paged decode attention: the reference for kernels.paged_attention and the path CPU tensors take.
#
# Contract: the same as paged_attention_triton (max_length is not needed). Computes in fp32 whatever the input
#   dtype and returns q's dtype. The same algorithm as the kernel, block-wise instead of tile-wise: one row per
#   (sequence, block) that holds keys, gathered from the pool, a softmax per row, then the rows of a sequence
#   merged by log-sum-exp. So it reads ceil(length / block_size) blocks per sequence, never the padding of a
#   batch to its longest sequence. Data-dependent shapes (and a host sync on CUDA): not for CUDA graphs.
# Limits: stale keys inside a sequence's last block are masked, but their values enter as 0 * value: they must be
#   finite (the sampler's pool starts zeroed and holds only real keys and values).
import torch


def paged_attention_reference(q, k_pool, v_pool, block_table, lengths, max_length=None):
    B, H, D = q.shape
    page, kvh = k_pool.shape[1], k_pool.shape[2]
    lengths = lengths.long()
    n_blocks = (lengths + page - 1) // page
    seq, idx = (torch.arange(int(n_blocks.max()), device=q.device) < n_blocks[:, None]).nonzero(as_tuple=True)
    blocks = block_table[seq, idx].long()  # one row per (sequence, block that holds keys)
    k = k_pool[blocks].float().permute(0, 2, 3, 1)  # [rows, kvh, D, page]
    v = v_pool[blocks].float().transpose(1, 2)  # [rows, kvh, page, D]
    qg = q.float().view(B, kvh, H // kvh, D)[seq]  # the query heads sharing a kv head are that head's rows
    s = (qg @ k) * D ** -0.5  # [rows, kvh, G, page]
    stale = idx[:, None] * page + torch.arange(page, device=q.device) >= lengths[seq][:, None]
    s.masked_fill_(stale[:, None, None], float("-inf"))
    m = s.amax(-1, keepdim=True)  # finite: every gathered block holds at least one key
    p = torch.exp(s - m)
    # merge the blocks of each sequence: partials (output, sum-exp, max) padded to [B, blocks, ...]
    part = torch.zeros(B, n_blocks.max(), kvh, H // kvh, D + 2, device=q.device)
    part[..., -1] = float("-inf")
    part[seq, idx] = torch.cat((p @ v, p.sum(-1, keepdim=True), m), -1)
    w = torch.exp(part[..., -1:] - part[..., -1:].amax(1, keepdim=True))  # 0 for the padding
    total = (part[..., :-1] * w).sum(1)
    return (total[..., :D] / total[..., D:]).reshape(B, H, D).to(q.dtype)
