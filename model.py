"""A hand-written Qwen2 / Qwen3 / Llama-3 decoder and a KV-cached sampler for RL rollouts (issues 3, 12).

The decoder reproduces transformers' Qwen2ForCausalLM / Qwen3ForCausalLM / LlamaForCausalLM and keeps their
parameter names, so Hugging Face checkpoints load as they are; the architecture differences are data
(ModelConfig), not subclasses.
`Sampler` (kept by the trainer across steps; `generate` is its one-shot form) samples from the trainer's own
weights, or on GPUs from a bf16 copy azr refreshes in place after each update (SPEC section 6 needs the
sampler's logprobs under the trainer's temperature): no second engine.
"""
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
except ImportError:
    flash_attn_varlen_func = flash_attn_with_kvcache = None

# ----------------------------------------------------------------------------------------------------------------
# the decoder


# model_type -> (q/k/v bias, q/k RMSNorm): all that tells the dense families apart in this decoder
FAMILIES = {"qwen2": (True, False), "qwen3": (False, True), "llama": (False, False)}


@dataclass
class ModelConfig:
    vocab_size: int  # LM-head rows; Qwen pads them above the tokenizer's size, Llama-3 does not
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # explicit: Qwen3's is not hidden_size / num_heads
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3.1/3.2: {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2 has biases on q, k and v (not on o)
    qk_norm: bool = False  # Qwen3 RMS-normalises each head of q and k (weights of size head_dim) before RoPE
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    model_type: str = "qwen2"  # a FAMILIES key: which transformers class to_hf() builds
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None  # Llama-3.2 instruct lists three

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        """From a transformers config; what this decoder does not implement is a one-line ValueError."""
        layers = set(getattr(hf, "layer_types", None) or ["full_attention"])  # transformers 5: each layer's kind
        fail = None
        if hf.model_type not in FAMILIES:
            moe = "moe" in hf.model_type or getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts", None)
            fail = (f"model_type {hf.model_type!r}: " + ("mixture-of-experts is not implemented; " if moe else "")
                    + "model.py implements the dense qwen2, qwen3 and llama families")
        elif getattr(hf, "hidden_act", "silu") != "silu":
            fail = "only SiLU MLPs are implemented"
        elif getattr(hf, "use_sliding_window", False) or layers != {"full_attention"}:
            fail = "sliding-window attention layers are not implemented (full attention only)"
        elif hf.model_type != "qwen2" and (getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False)):
            fail = f"{hf.model_type} with attention_bias/mlp_bias is not implemented"
        # transformers 5 keeps rope_theta inside rope_parameters; 4.x had rope_theta + rope_scaling
        rope = dict(getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta, **(hf.rope_scaling or {})})
        theta = rope.pop("rope_theta")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            fail = fail or f"rope_type {rope_type!r} is not implemented (default and llama3 are)"
        if fail:
            raise ValueError(f"unsupported model config: {fail}")
        qkv_bias, qk_norm = FAMILIES[hf.model_type]
        return cls(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
                   num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
                   num_kv_heads=hf.num_key_value_heads,
                   head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
                   rope_theta=theta, rope_scaling=rope if rope_type == "llama3" else None,
                   rms_norm_eps=hf.rms_norm_eps, qkv_bias=qkv_bias, qk_norm=qk_norm,
                   tie_word_embeddings=bool(hf.tie_word_embeddings),
                   max_position_embeddings=hf.max_position_embeddings, model_type=hf.model_type,
                   bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id)

    def to_hf(self):
        from transformers import AutoConfig
        if FAMILIES.get(self.model_type) != (self.qkv_bias, self.qk_norm):
            raise ValueError(f"model_type {self.model_type!r} with qkv_bias={self.qkv_bias}, qk_norm={self.qk_norm} "
                             f"matches no family; (qkv_bias, qk_norm) per model_type: {FAMILIES}")
        hf = AutoConfig.for_model(
            self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})},
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id)
        hf.architectures = [type(hf).__name__.replace("Config", "ForCausalLM")]
        return hf


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        h = x.float()  # fp32 statistics, as the reference implementation
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(config: ModelConfig, positions, dtype):
    """cos/sin tables [..., head_dim] for integer positions, in fp32 then cast (as transformers does)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=positions.device).float() / d))
    if config.rope_scaling:  # Llama-3.1: slow down the low frequencies, interpolate the middle band
        s = config.rope_scaling
        old_len, low, high = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / s["factor"], inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x [B, T, heads, D]; cos, sin [B, T, D]
    x1, x2 = x.chunk(2, -1)
    return x * cos[:, :, None] + torch.cat((-x2, x1), -1) * sin[:, :, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c, self.layer_idx = config, layer_idx
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        if c.qk_norm:  # Qwen3: each head of q and k is RMS-normalised before RoPE
            self.q_norm, self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps), RMSNorm(c.head_dim, c.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.head_dim = c.head_dim

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)), cos, sin)
        k = apply_rope(self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim)), cos, sin)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        if cache is None:  # training: plain causal attention over the whole row
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True).transpose(1, 2)
        else:
            y = cache.attend(self.layer_idx, q, k, v)
        return self.o_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    checkpointing = False  # the trainer sets it: recompute this block in backward instead of storing activations

    def forward(self, x, cos, sin, cache=None):
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        return self._forward(x, cos, sin, cache)

    def _forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, token_ids, positions=None, cache=None):
        """Final-norm hidden states [B, T, hidden] (not logits: the trainer's fused kernel applies lm_head).
        Without a cache, row b attends causally to its own tokens at positions 0..T-1."""
        if positions is None:
            positions = torch.arange(token_ids.shape[1], device=token_ids.device)[None]
        x = self.embed_tokens(token_ids)
        cos, sin = rope_cos_sin(self.config, positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------------------------
# loading and saving

HUB_IDS = {name: f"Qwen/{name}" for name in (  # the README's model table lists these
    "Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-3B", "Qwen2.5-7B", "Qwen2.5-14B",
    "Qwen2.5-Coder-0.5B", "Qwen2.5-Coder-1.5B", "Qwen2.5-Coder-3B", "Qwen2.5-Coder-7B", "Qwen2.5-Coder-14B",
    "Qwen2.5-0.5B-Instruct", "Qwen2.5-1.5B-Instruct", "Qwen2.5-7B-Instruct",
    "Qwen2.5-Coder-0.5B-Instruct", "Qwen2.5-Coder-1.5B-Instruct",
    "Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B",
    "Qwen3-0.6B-Base", "Qwen3-1.7B-Base", "Qwen3-4B-Base", "Qwen3-8B-Base")}
HUB_IDS |= {name: f"meta-llama/{name}" for name in ("Llama-3.1-8B", "Llama-3.2-1B", "Llama-3.2-3B")}


def tiny_config() -> ModelConfig:
    """Qwen2-shaped, 2 layers; 320 LM-head rows above a 257-token tokenizer, so vocab masking is exercised."""
    return ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, rope_theta=1e6, qkv_bias=True, tie_word_embeddings=True,
                       max_position_embeddings=32768, model_type="qwen2", eos_token_id=256)


def byte_tokenizer():
    """Byte-level tokenizer with no merges: 256 byte tokens + <|endoftext|> (id 256); every string round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def init_weights(model: Transformer, seed: int, std: float = 0.02) -> Transformer:
    """Deterministic random weights (norms at 1, everything else N(0, std)), independent of the global RNG."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape, generator=g) * std
            p.copy_(w)
    return model


def empty_model(config: ModelConfig, device, dtype) -> Transformer:
    """A model with allocated but uninitialised weights, for weights that are about to be copied in."""
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    model = model.to_empty(device=device)
    model.tie_weights()  # to_empty gives the shared weight two fresh tensors
    return model


def load_model(name: str, device="cpu", dtype=torch.float32, seed: int = 0):
    """`tiny`, a local Hugging Face directory (config.json + *.safetensors), a hub id or a short name.
    A Qwen3 model whose name (short name, hub id or path) has `-Base` in it gets plain_think's tokenizer: base and
    post-trained Qwen3 ship the same tokenizer files, and upstream, too, strips the tokens for base models only."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer
    if name == "tiny":
        return init_weights(Transformer(tiny_config()), seed).to(device=device, dtype=dtype), byte_tokenizer()
    path = Path(name) if Path(name).is_dir() else _download(name)
    try:
        config = ModelConfig.from_hf(AutoConfig.from_pretrained(path))
    except ValueError as e:
        raise SystemExit(f"cannot load model {name!r}: {e}") from None
    tokenizer = AutoTokenizer.from_pretrained(path)
    if config.model_type == "qwen3" and re.search(r"-base\b", name, re.IGNORECASE):
        tokenizer = plain_think(tokenizer)
    if len(tokenizer) > config.vocab_size:  # the sampler and the trainer index LM-head rows by token id
        raise SystemExit(f"cannot load model {name!r}: its tokenizer has {len(tokenizer)} tokens but its LM head only "
                         f"{config.vocab_size} rows")
    model = empty_model(config, device, dtype)
    params, loaded = model.state_dict(), set()
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                k = key.removeprefix("model.")
                if k not in params:
                    raise ValueError(f"{file}: unexpected tensor {key} for a {config.model_type} model")
                params[k].copy_(f.get_tensor(key))
                loaded.add(k)
    missing = set(params) - loaded - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {sorted(missing)[:3]}...")
    return model, tokenizer


THINK_TOKENS = ("<think>", "</think>")


def plain_think(tokenizer):
    """The tokenizer without `<think>`/`</think>` as added tokens, so the R1 template's literal `<think>` (SPEC 2)
    is plain text, as upstream does for Qwen3 base models: their embeddings of these tokens are untrained, and
    upstream's README says the model "produces nonsense" otherwise. Their ids (Qwen3's last two) then lie at or
    above len(tokenizer), where the sampler and the trainer mask LM-head rows, so they are never sampled either.
    A no-op when the tokens are absent; save_model writes the stripped tokenizer, so checkpoints keep the rule."""
    from transformers import AutoTokenizer
    if not set(THINK_TOKENS) & set(tokenizer.get_added_vocab()):
        return tokenizer
    print("model.py: Qwen3 base model: <think> and </think> tokenise as plain text", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:  # edit the saved files, as upstream does: every class reads them
        files = Path(tmp) / "tokenizer.json", Path(tmp) / "tokenizer_config.json"
        tokenizer.save_pretrained(tmp)
        backend, config = (json.loads(f.read_text()) for f in files)
        backend["added_tokens"] = [t for t in backend["added_tokens"] if t["content"] not in THINK_TOKENS]
        if "added_tokens_decoder" in config:
            config["added_tokens_decoder"] = {i: t for i, t in config["added_tokens_decoder"].items()
                                              if t["content"] not in THINK_TOKENS}
        for f, state in zip(files, (backend, config)):
            f.write_text(json.dumps(state, ensure_ascii=False))
        return AutoTokenizer.from_pretrained(tmp)


def _download(name: str) -> Path:
    from huggingface_hub import snapshot_download
    repo = HUB_IDS.get(name, name)
    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # offline, unknown id, gated repo: all end the same way for the user
        raise SystemExit(f"cannot load model {name!r} (hub id {repo!r}: {type(e).__name__}); pass a local directory "
                         f"with config.json and *.safetensors instead, e.g. --model /path/to/{Path(name).name}")


def save_model(model: Transformer, tokenizer, path) -> None:
    """Hugging Face layout (config.json, model.safetensors, tokenizer files) that AutoModelForCausalLM loads."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = model.config.to_hf()
    hf.dtype = model.embed_tokens.weight.dtype
    hf.save_pretrained(path)
    tied = model.config.tie_word_embeddings
    state = {}
    for k, v in model.state_dict().items():
        if tied and k == "lm_head.weight":
            continue  # transformers re-ties it from the embedding
        v = v.full_tensor() if hasattr(v, "full_tensor") else v  # FSDP2 DTensor: gather (collective)
        state[k if k == "lm_head.weight" else "model." + k] = v.detach().to("cpu").contiguous()
    save_file(state, path / "model.safetensors.tmp", metadata={"format": "pt"})
    os.replace(path / "model.safetensors.tmp", path / "model.safetensors")
    tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------------------------------------------
# the sampler

SYNC_EVERY = 8  # decode steps between host checks for stops and refills: the only host syncs of the loop
PREFILL_TOKENS = 8192  # prompt tokens packed into one prefill forward (bounds its activation memory)
BLOCK_SIZE = 256  # tokens per KV block; flash-attn's paged decode needs a multiple of 256
MAX_BATCH = 512  # decode rows at most: sizes the static decode buffers and the sampling workspace
# free blocks admission leaves per running sequence: each needs a new block every block_size / SYNC_EVERY decode
# blocks, so this covers the growth of the batch for ~16 of them. On the AZR replay in a 4 GiB (3B) pool it cut
# preemptions from 314 to 99 and recomputed prompt tokens by half, for 23% lower peak concurrency.
ADMIT_RESERVE = 0.5


@dataclass
class Sample:
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockAllocator:
    """Reference-counted KV blocks: the n samples of a prompt hold its full blocks together, and a block returns to
    the free list when its last holder releases it."""

    def __init__(self, num_blocks: int):
        self.num_blocks, self.refs = num_blocks, [0] * num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest ids go out first

    def take(self, count: int) -> list[int]:
        blocks = [self.free.pop() for _ in range(count)]
        for b in blocks:
            self.refs[b] = 1
        return blocks

    def share(self, blocks):
        for b in blocks:
            self.refs[b] += 1

    def release(self, blocks):
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)

    @property
    def in_use(self) -> int:
        return self.num_blocks - len(self.free)


class KVCache:
    """The KV block pool: kv[layer, 0 or 1] holds keys or values as [num_blocks + 1, block_size, kv_heads, head_dim]
    (the extra last block is scratch that padding rows of a decode batch write and read). Besides the tensor it holds
    the context of the current forward (the pool slot each new token writes; for decode the block tables and key
    counts), as nano-vllm does, so the decoder layers only call attend()."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, device, dtype):
        # zeros, not empty: the reference attention multiplies stale values by 0, and NaN * 0 is NaN
        self.kv = torch.zeros(config.num_layers, 2, num_blocks + 1, block_size, config.num_kv_heads, config.head_dim,
                              device=device, dtype=dtype)
        self.num_blocks, self.block_size, self.scratch = num_blocks, block_size, num_blocks
        cuda = torch.device(device).type == "cuda"
        self.flash = (flash_attn_with_kvcache is not None and cuda and dtype in (torch.float16, torch.bfloat16)
                      and block_size % 256 == 0)
        self.backend = ("flash-attn (paged)" if self.flash else "the Triton paged kernel" if cuda
                        else "the PyTorch reference")
        # a sequence of L keys costs ceil(L / granularity) * granularity key reads in decode attention
        self.granularity = kernels.paged_attention.tile_keys(block_size, dtype) if cuda and not self.flash \
            else block_size

    def prefill(self, slots, cu_seqlens: list[int]):
        """Packed ragged sequences: token t writes pool slot slots[t] (block * block_size + offset); sequence i is
        tokens cu[i]:cu[i+1] and attends causally to itself only."""
        self.decoding, self.slots, self.bounds = False, slots, cu_seqlens
        self.cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=slots.device)
        self.max_seqlen = max(b - a for a, b in zip(cu_seqlens, cu_seqlens[1:]))

    def decode(self, slots, table, lengths, max_length: int):
        """One new token per row b, written to slots[b]; row b attends to its lengths[b] keys (the new one
        included) in its blocks table[b]; max_length bounds lengths (it fixes the kernel's launch shape)."""
        self.decoding, self.slots, self.table, self.lengths, self.max_length = True, slots, table, lengths, max_length

    def attend(self, layer, q, k, v):
        kc, vc = self.kv[layer]
        q, k, v = (t.to(kc.dtype) for t in (q, k, v))  # under autocast, rope leaves q, k in fp32
        heads, dim = kc.shape[2:]
        kc.view(-1, heads, dim)[self.slots] = k.reshape(-1, heads, dim)
        vc.view(-1, heads, dim)[self.slots] = v.reshape(-1, heads, dim)
        if self.decoding:
            if self.flash:
                return flash_attn_with_kvcache(q, kc, vc, cache_seqlens=self.lengths, block_table=self.table,
                                               causal=True)
            return kernels.paged_decode(q[:, 0], kc, vc, self.table, self.lengths, self.max_length)[:, None]
        if self.flash:
            return flash_attn_varlen_func(q[0], k[0], v[0], self.cu, self.cu, self.max_seqlen, self.max_seqlen,
                                          causal=True)[None]
        ys = [F.scaled_dot_product_attention(*(t[:, a:b].transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                             enable_gqa=True)
              for a, b in zip(self.bounds, self.bounds[1:])]
        return torch.cat(ys, 2).transpose(1, 2)


def _hash(x):
    """32-bit integer mix (uint32 values held in int64; every product stays below 2**63, so no overflow)."""
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def _gumbel(seed, sample_ids, steps, vocab: int):
    """Gumbel noise that is a pure function of (seed, sample id, step, token id), so a sample's tokens do not
    depend on which other samples share its batch, the pool size, the order of admission, or the device."""
    h = _hash(_hash(_hash(seed.expand_as(sample_ids)) ^ sample_ids) ^ steps)
    u = ((_hash(h[:, None] ^ torch.arange(vocab, device=h.device)) >> 8).float() + 0.5) / 2 ** 24
    return -torch.log(-torch.log(u))


def sample_tokens(logits, temperature: float, top_p: float, seed, sample_ids, steps):
    """Next tokens and their logprobs log_softmax(logits / T) (unscaled logits for T = 0, greedy).
    top-p truncates what may be drawn; the returned logprob stays that of the untruncated T-scaled
    distribution, which is what the trainer recomputes. seed is a 0-dim int64 tensor on the logits' device
    (device memory, so that one CUDA graph serves every call)."""
    if temperature == 0:
        token = logits.argmax(-1)
        logp = logits.log_softmax(-1)
    else:
        logp = (logits / temperature).log_softmax(-1)
        pick = logp
        if top_p < 1:
            sorted_lp, order = logp.sort(-1, descending=True)
            p = sorted_lp.exp()
            drop = p.cumsum(-1) - p >= top_p  # the tokens before this one already hold top_p of the mass
            pick = logp.masked_fill(drop.scatter(-1, order, drop), -math.inf)
        token = (pick + _gumbel(seed, sample_ids, steps, logits.shape[-1])).argmax(-1)
    return token, logp.gather(-1, token[:, None])[:, 0]


def _bucket(rows: int) -> int:
    """Decode batch size that CUDA graphs are captured for: four sizes per octave, so at most 25% padding rows."""
    step = 1 << max(0, rows.bit_length() - 3)
    return _cdiv(rows, step) * step


@cache
def _announce(backend: str):
    print(f"model.py: decode attention via {backend}", file=sys.stderr)


class Sampler:
    """A sampler the trainer keeps across steps: one KV block pool (allocated once), static decode buffers and the
    CUDA graphs captured per decode bucket live as long as the object, so only the first calls pay for captures.
    Graphs hold pointers to the weights, which the trainer updates in place; if a parameter is replaced by a new
    tensor, the next call notices and captures again.

    Pool size: kv_cache_gib if given; else on CUDA the driver-free memory at creation (after empty_cache) minus
    reserve_gib (room for whatever the caller allocates later, e.g. gradients and AdamW state), the prefill and
    sampling workspace and a 5% margin (at least 1 GiB); else (CPU) whatever each call's workload needs without
    preemption (at most half the free RAM), grown on demand. max_batch_size caps the sequences decoded at once."""

    def __init__(self, model: Transformer, kv_cache_gib: float | None = None, reserve_gib: float = 0.0,
                 block_size: int = BLOCK_SIZE, max_batch_size: int = MAX_BATCH):
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        if max_batch_size < 1 or reserve_gib < 0 or (kv_cache_gib is not None and not kv_cache_gib > 0):
            raise ValueError(f"need max_batch_size >= 1, reserve_gib >= 0 and kv_cache_gib > 0 (or None), got "
                             f"{max_batch_size}, {reserve_gib} and {kv_cache_gib}")
        w = model.embed_tokens.weight
        self.model, self.device, self.block_size, self.max_rows = model, w.device, block_size, max_batch_size
        # an fp32 model run under autocast computes (and caches keys/values) in the autocast dtype
        self.dtype = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype
        c = model.config
        self.block_bytes = block_size * kv_bytes_per_token(c, self.dtype)
        with torch.inference_mode():  # decode state per row: last token, its position, sample id, tokens so far
            self.tok, self.pos, self.sid, self.step = (torch.zeros(max_batch_size, dtype=torch.long,
                                                                   device=self.device) for _ in range(4))
            self.seed = torch.zeros((), dtype=torch.long, device=self.device)
            self.out_tok = torch.zeros(SYNC_EVERY, max_batch_size, dtype=torch.long, device=self.device)
            self.out_lp = torch.zeros(SYNC_EVERY, max_batch_size, device=self.device)
        self.table = self.cache = self.weights = self.graph_pool = None
        self.graphs, self.stats = {}, {}
        self.graphed = self.device.type == "cuda"  # decode steps as CUDA graphs, the batch padded to a bucket
        self._ensure_table(_cdiv(c.max_position_embeddings + SYNC_EVERY, block_size))
        self.grows = kv_cache_gib is None and self.device.type != "cuda"
        if kv_cache_gib is not None:
            if self.device.type == "cuda" and kv_cache_gib * 2 ** 30 > torch.cuda.mem_get_info(self.device)[0]:
                raise ValueError(f"kv_cache_gib={kv_cache_gib} is more than the "
                                 f"{torch.cuda.mem_get_info(self.device)[0] / 2 ** 30:.1f} GiB free on {self.device}")
            self._allocate(int(kv_cache_gib * 2 ** 30 // self.block_bytes))
        elif self.device.type == "cuda":
            self._allocate(self._blocks_that_fit(reserve_gib))

    def _blocks_that_fit(self, reserve_gib: float) -> int:
        torch.cuda.empty_cache()  # memory PyTorch caches but does not use is free only once handed back
        free = torch.cuda.mem_get_info(self.device)[0]
        c, item = self.model.config, self.dtype.itemsize
        prefill = PREFILL_TOKENS * (3 * c.intermediate_size + 6 * c.hidden_size) * item
        # per decode row: fp32 logits and int64 noise over the vocabulary; split partials of the Triton decode
        splits = _cdiv(c.max_position_embeddings + SYNC_EVERY, kernels.paged_attention.SPLIT_KEYS)
        rows = self.max_rows * (32 * c.vocab_size + 4 * max(c.num_heads, 16 * c.num_kv_heads) * (c.head_dim + 2)
                                * splits)
        blocks = int((free - reserve_gib * 2 ** 30 - prefill - rows - max(2 ** 30, free // 20)) // self.block_bytes)
        if blocks < 1:
            raise ValueError(f"no GPU memory left for a KV pool ({free / 2 ** 30:.1f} GiB free, {reserve_gib} GiB "
                               f"reserved): lower reserve_gib or max_batch_size, or pass kv_cache_gib")
        return blocks

    def _allocate(self, blocks: int):
        self.cache = None  # the old pool (if growing) goes before the new one is made
        with torch.inference_mode():
            self.cache = KVCache(self.model.config, blocks, self.block_size, self.device, self.dtype)
        self.alloc = BlockAllocator(blocks)
        _announce(self.cache.backend)

    def _ensure_table(self, width: int):
        """Block tables of the decode rows, [max_batch_size, width] int32; graphs hold the old one, so they go."""
        if self.table is None or self.table.shape[1] < width:
            with torch.inference_mode():
                self.table = torch.zeros(self.max_rows, width, dtype=torch.int32, device=self.device)
            self.graphs, self.graph_pool = {}, None  # a fresh pool: the next capture primes it (_Rollout._decode)

    def generate(self, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int | Sequence[int],
                 temperature: float = 1.0, top_p: float = 1.0, stop_token_ids: Sequence[int] = (),
                 stop_strings: Sequence[str] = (), stop_after: str | None = None, tokenizer=None, seed: int = 0,
                 progress: bool = False, max_batch_size: int | None = None) -> list[Sample]:
        """The module-level generate()'s contract, on this sampler's pool and graphs; afterwards self.stats holds
        the call's counters (decode attention keys read and needed, decoded rows and running sequences summed
        over decode steps, peak running sequences, preemptions, blocks in use at the end: always 0)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and every prompt at least one token")
        if (stop_strings or stop_after is not None) and tokenizer is None:
            raise ValueError("stop_strings and stop_after need the tokenizer: pass tokenizer=...")
        limits = [max_new_tokens] if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if n >= 1 and len(limits) in (1, len(prompts)):
            limits = [limits[(k // n) % len(limits)] for k in range(len(prompts) * n)]
        if (n < 1 or len(limits) != len(prompts) * n or min(limits) < 1 or temperature < 0 or not 0 < top_p <= 1
                or (max_batch_size is not None and max_batch_size < 1)):
            raise ValueError("need n >= 1, max_new_tokens >= 1 (an int, one per prompt or one per sample), "
                             "temperature >= 0, 0 < top_p <= 1 and max_batch_size >= 1")
        bs = self.block_size
        longest = max(len(prompts[k // n]) + m for k, m in enumerate(limits))
        one = _cdiv(longest + SYNC_EVERY, bs)
        self._ensure_table(one)
        if self.grows:  # each prompt's full blocks once, every sample's own tail up to its limit; half the free RAM
            need = sum(len(p) // bs for p in prompts) + sum(
                _cdiv(len(prompts[k // n]) + m + SYNC_EVERY, bs) - len(prompts[k // n]) // bs
                for k, m in enumerate(limits))
            ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2 // self.block_bytes
            need = max(one, min(need, ram))
            if self.cache is None or self.cache.num_blocks < need:
                self._allocate(need)
        if self.cache.num_blocks < one:  # the oldest sequence must always be able to grow to its limit alone
            raise ValueError(f"the KV pool has {self.cache.num_blocks} blocks of {bs} tokens, fewer than the {one} "
                             f"that one sequence of {longest} tokens (prompt + max_new_tokens) needs: raise "
                             f"kv_cache_gib or lower max_new_tokens")
        weights = [p.data_ptr() for p in self.model.parameters()]
        if weights != self.weights:  # replaced (not updated in place) parameters: the graphs read stale memory
            self.graphs, self.graph_pool = {}, None
            self.weights = weights
        with torch.inference_mode():
            rollout = _Rollout(self, prompts, n, limits, temperature, top_p, stop_token_ids, stop_strings,
                               stop_after, tokenizer, seed, max_batch_size)
            samples = rollout.run(progress)
        self.stats = rollout.stats
        if self.device.type == "cuda":  # hand prefill and sampling temporaries back before the trainer allocates
            torch.cuda.empty_cache()
        return samples


def kv_bytes_per_token(config, dtype) -> int:
    """KV cache bytes one token takes: a key and a value per kv head in every layer."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize


class _Seq:
    """A sample in flight: its tokens so far and their logprobs, its block table, and the index of the token that
    completed the stop_after marker (None until it has)."""
    __slots__ = ("sample", "prompt", "limit", "tokens", "logprobs", "blocks", "marker_end")

    def __init__(self, sample: int, prompt: int, limit: int):
        self.sample, self.prompt, self.limit = sample, prompt, limit
        self.tokens, self.logprobs, self.blocks, self.marker_end = [], [], [], None


class _Rollout:
    """One generate() call: a queue of samples (prompt groups; preempted samples at the front), the running
    sequences (oldest first), and a decode loop that every SYNC_EVERY steps harvests finished samples, returns
    their blocks and admits queued ones (continuous batching). Sample k is prompt k // n."""

    def __init__(self, sampler, prompts, n, limits, temperature, top_p, stop_token_ids, stop_strings, stop_after,
                 tokenizer, seed, max_batch_size):
        s = self.s = sampler
        self.model, self.cache, self.alloc, self.prompts = s.model, s.cache, s.alloc, prompts
        self.temperature, self.top_p = temperature, top_p
        self.stop_ids, self.stop_strings, self.tokenizer = set(stop_token_ids), list(stop_strings), tokenizer
        self.stop_after = stop_after
        # a string ends within this many trailing tokens (every token decodes to >= 1 byte)
        self.window = max((len(t.encode()) for t in self.stop_strings), default=0) + 4
        self.marker_window = len(stop_after.encode()) + 4 if stop_after is not None else 0
        self.vocab = len(tokenizer) if tokenizer is not None else s.model.config.vocab_size
        self.max_rows = min(s.max_rows, max_batch_size or s.max_rows)
        self.queue = deque([_Seq(i * n + j, i, limits[i * n + j]) for j in range(n)] for i in range(len(prompts)))
        self.running, self.results = [], [None] * len(limits)
        self.graphed = s.graphed
        s.seed.fill_(seed & 0xFFFFFFFF)
        self.stats = dict.fromkeys(("decode_steps", "decoded_rows", "graph_rows", "running_rows", "keys_read",
                                    "keys_needed", "peak_running", "preemptions", "prefills", "prefill_tokens",
                                    "graphs_captured"), 0)

    def run(self, progress: bool) -> list[Sample]:
        from tqdm import tqdm
        bar, t0, kept = tqdm(total=len(self.results), unit="seq", desc="generate", disable=not progress), time.time(), 0
        while self.queue or self.running:
            done = self._admit()
            self._reserve()
            if self.running:
                self._decode_block()
                done += self._harvest()
            kept += sum(len(self.results[k].tokens) for k in done)
            bar.update(len(done))
            bar.set_postfix(tok_s=f"{kept / (time.time() - t0):.0f}")
        bar.close()
        self.stats.update(blocks_in_use=self.alloc.in_use, num_blocks=self.alloc.num_blocks,
                          graphs=len(self.s.graphs))
        return self.results

    def _kv_len(self, seq: _Seq) -> int:  # positions in the cache; the last token is the next decode input
        return len(self.prompts[seq.prompt]) + len(seq.tokens) - 1

    def _logits(self, hidden):
        logits = self.model.lm_head(hidden).float()
        logits[:, self.vocab:] = -math.inf  # padded LM-head rows are untrained: never sample them
        return logits

    def _admit(self) -> list[int]:
        """Prefill queued samples while free blocks and decode rows last. The n samples of a prompt share its full
        blocks (one prefill); each gets its own blocks from the partial last one on. A preempted sample is
        recomputed from its prompt + its tokens so far. Admission leaves ADMIT_RESERVE free blocks per running
        sequence; with nothing running the queue's head always fits (generate checked the pool)."""
        bs, alloc = self.cache.block_size, self.alloc
        batch, budget, rows = [], PREFILL_TOKENS, len(self.running)
        while self.queue and rows < self.max_rows:
            group = self.queue[0]
            ids = self.prompts[group[0].prompt] + group[0].tokens
            if batch and len(ids) > budget:
                break
            shared = len(ids) // bs
            own = _cdiv(len(ids) + SYNC_EVERY, bs) - shared  # through the positions the first decode block writes
            spare = len(alloc.free) - shared - math.ceil(ADMIT_RESERVE * rows)
            m = min(len(group), self.max_rows - rows, spare // own)
            if m < 1:
                break
            members = group[:m]
            del group[:m]
            if not group:
                self.queue.popleft()
            full = alloc.take(shared)
            alloc.share(full * (m - 1))
            for seq in members:
                seq.blocks = full + alloc.take(own)
            batch.append((ids, members))
            budget, rows = budget - len(ids), rows + m
        return self._prefill(batch) if batch else []

    def _prefill(self, batch) -> list[int]:
        """One forward over the packed sequences, written into the first member's blocks; then the siblings fork
        (each copies the partial last block before its first write into it) and every member samples its next
        token. Returns the samples that end right away."""
        dev, bs, cache = self.s.device, self.cache.block_size, self.cache
        ids, pos, slots, cu = [], [], [], [0]
        for tokens, members in batch:
            table = members[0].blocks
            ids += tokens
            pos += range(len(tokens))
            slots += [table[p // bs] * bs + p % bs for p in range(len(tokens))]
            cu.append(cu[-1] + len(tokens))
        cache.prefill(torch.tensor(slots, device=dev), cu)
        hidden = self.model(torch.tensor(ids, device=dev)[None], torch.tensor(pos, device=dev)[None], cache)
        hidden = hidden[0, torch.tensor(cu[1:], device=dev) - 1]
        src, dst = [], []  # copy on write of the partial last block, all layers, keys and values
        for tokens, members in batch:
            if len(tokens) % bs:
                for seq in members[1:]:
                    src.append(members[0].blocks[len(tokens) // bs])
                    dst.append(seq.blocks[len(tokens) // bs])
        if src:  # layer by layer: all layers at once would hold n_copies x a block of every layer (GBs for 3B)
            src, dst = torch.tensor(src, device=dev), torch.tensor(dst, device=dev)
            for layer in cache.kv:
                layer[:, dst] = layer[:, src]
        flat = [(g, seq) for g, (_, members) in enumerate(batch) for seq in members]
        row = torch.tensor([g for g, _ in flat], device=dev)
        sid = torch.tensor([seq.sample for _, seq in flat], device=dev)
        step = torch.tensor([len(seq.tokens) for _, seq in flat], device=dev)
        token, logp = sample_tokens(self._logits(hidden)[row], self.temperature, self.top_p, self.s.seed, sid, step)
        self.stats["prefills"] += 1
        self.stats["prefill_tokens"] += cu[-1]
        done = []
        for (_, seq), t, lp in zip(flat, token.tolist(), logp.tolist()):
            seq.tokens.append(t)
            seq.logprobs.append(lp)
            if self._end(seq, len(seq.tokens) - 1):
                done.append(seq.sample)
            else:
                self.running.append(seq)
        return done

    def _reserve(self):
        """Blocks for every position the next decode block writes, oldest sequence first. When the pool runs out
        the newest running sequence is preempted: it releases its blocks and goes back to the front of the queue
        with its tokens, to be recomputed later. The oldest one never is (the pool holds one sequence of maximal
        length alone), so every decode block makes progress and no sample is lost."""
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            need = _cdiv(self._kv_len(seq) + SYNC_EVERY, self.cache.block_size) - len(seq.blocks)
            while len(self.alloc.free) < need and len(self.running) > i:
                victim = self.running.pop()
                self.alloc.release(victim.blocks)
                victim.blocks = []
                self.queue.appendleft([victim])
                self.stats["preemptions"] += 1
            if len(self.running) > i and need > 0:
                seq.blocks += self.alloc.take(need)
            i += 1

    def _decode_block(self):
        """SYNC_EVERY decode steps of the running sequences without a host sync. On CUDA the batch is padded to a
        graph bucket with rows that write to and read only the scratch block."""
        s, rows = self.s, self.running
        R = len(rows)
        B = min(_bucket(R), s.max_rows) if self.graphed else R
        lens = [self._kv_len(seq) for seq in rows]
        width = max(len(seq.blocks) for seq in rows)
        state = torch.tensor([[seq.tokens[-1] for seq in rows] + [0] * (B - R), lens + [0] * (B - R),
                              [seq.sample for seq in rows] + [0] * (B - R),
                              [len(seq.tokens) for seq in rows] + [0] * (B - R)])
        table = torch.tensor([seq.blocks + [0] * (width - len(seq.blocks)) for seq in rows]
                             + [[self.cache.scratch] * width] * (B - R), dtype=torch.int32)
        for buf, values in zip((s.tok, s.pos, s.sid, s.step), state):
            buf[:B].copy_(values)
        s.table[:B, :width].copy_(table)
        max_length = max(lens) + SYNC_EVERY  # keys of the longest row at the block's last step
        if self.graphed:  # few launch shapes, so few graphs (flash-attn's call does not depend on it)
            split = kernels.paged_attention.SPLIT_KEYS
            max_length = 0 if self.cache.flash else split << (_cdiv(max_length, split) - 1).bit_length()
        for i in range(SYNC_EVERY):
            token, logp = self._decode(B, max_length)
            s.out_tok[i, :B], s.out_lp[i, :B] = token, logp
            s.tok[:B], s.pos[:B], s.step[:B] = token, s.pos[:B] + 1, s.step[:B] + 1
        g, st = self.cache.granularity, self.stats
        st["decode_steps"] += SYNC_EVERY
        st["decoded_rows"] += B * SYNC_EVERY
        st["graph_rows"] += min(_bucket(R), s.max_rows) * SYNC_EVERY
        st["peak_running"] = max(st["peak_running"], R)
        st["keys_read"] += sum(_cdiv(L + j, g) * g for L in lens for j in range(1, SYNC_EVERY + 1)) + \
            (B - R) * SYNC_EVERY * g

    def _decode(self, B: int, max_length: int):
        """One decode step of rows 0..B-1; on CUDA a graph per bucket replaces ~10 launches per layer. The graphs
        live on the Sampler and read every input from its static buffers (the seed included)."""
        if not self.graphed:
            return self._forward_decode(B, max_length)
        s, key = self.s, (B, max_length, self.temperature, self.top_p, self.vocab)
        if key not in s.graphs:
            if s.graph_pool is None and B < s.max_rows:
                # The first capture into a fresh pool is of the largest bucket: the smaller ones captured later then
                # reuse its temporaries (~32 bytes x vocabulary per row). Captured smallest first, each larger bucket
                # would reserve new segments for as long as the graphs live (GBs over a step's ramp to 512 rows).
                # Its padding rows write and read only the scratch block.
                s.tok[B:], s.pos[B:], s.sid[B:], s.step[B:] = 0, 0, 0, 0
                s.table[B:] = self.cache.scratch
                self._capture((s.max_rows,) + key[1:])
            self._capture(key)
        graph, out = s.graphs[key]
        graph.replay()
        return out

    def _capture(self, key):
        s, (B, max_length) = self.s, key[:2]
        stream = torch.cuda.Stream(s.device)
        stream.wait_stream(torch.cuda.current_stream(s.device))
        with torch.cuda.stream(stream):  # warm-up outside the graph; its cache writes are rewritten identically
            self._forward_decode(B, max_length)
        torch.cuda.current_stream(s.device).wait_stream(stream)
        s.graph_pool = s.graph_pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=s.graph_pool, capture_error_mode="thread_local"):
            out = self._forward_decode(B, max_length)
        s.graphs[key] = graph, out
        self.stats["graphs_captured"] += 1

    def _forward_decode(self, B: int, max_length: int):
        s, bs = self.s, self.cache.block_size
        pos, table = s.pos[:B], s.table[:B]
        slots = table.gather(1, (pos // bs)[:, None])[:, 0].long() * bs + pos % bs
        self.cache.decode(slots, table, (pos + 1).int(), max_length)
        hidden = self.model(s.tok[:B, None], pos[:, None], self.cache)[:, 0]
        return sample_tokens(self._logits(hidden), self.temperature, self.top_p, s.seed, s.sid[:B], s.step[:B])

    def _harvest(self) -> list[int]:
        """Copy the block's tokens to the host (the one sync per block), end the samples that stopped and return
        their blocks; count the steps each sample still needed."""
        R, st = len(self.running), self.stats
        new_tok = self.s.out_tok[:, :R].T.tolist()
        new_lp = self.s.out_lp[:, :R].T.tolist()
        done, still = [], []
        for seq, toks, lps in zip(self.running, new_tok, new_lp):
            old, L = len(seq.tokens), self._kv_len(seq)
            seq.tokens += toks
            seq.logprobs += lps
            ended = self._end(seq, old)
            steps = len(self.results[seq.sample].tokens) - old if ended else SYNC_EVERY
            st["running_rows"] += steps
            st["keys_needed"] += steps * (L + 1) + steps * (steps - 1) // 2
            if ended:
                done.append(seq.sample)
            else:
                still.append(seq)
        self.running = still
        return done

    def _end(self, seq: _Seq, old: int) -> bool:
        """End seq at the first stop among its tokens[old:]: a stop id, a stop string (counted only after the
        stop_after marker, if one is given) or its token limit; the stop tokens are kept. Records the Sample and
        releases the blocks."""
        found = self._find_end(seq, old)
        if found is None:
            return False
        last, reason = found
        self.results[seq.sample] = Sample(seq.tokens[:last + 1], seq.logprobs[:last + 1], reason)
        self.alloc.release(seq.blocks)
        seq.blocks = []
        return True

    def _find_end(self, seq: _Seq, old: int):
        tokens, string_end = seq.tokens, None
        if self.stop_strings:
            if self.stop_after is not None and seq.marker_end is None:
                seq.marker_end = self._completion(tokens, old, [self.stop_after], self.marker_window, None)
            if self.stop_after is None or seq.marker_end is not None:
                string_end = self._completion(tokens, max(old, seq.marker_end or 0), self.stop_strings, self.window,
                                              seq.marker_end)
        for i in range(old, len(tokens)):
            if tokens[i] in self.stop_ids or i == string_end:
                return i, "stop"
            if i == seq.limit - 1:
                return i, "length"
        return None

    def _completion(self, tokens: list[int], start: int, strings: list[str], window: int, after: int | None):
        """Index of the first token from `start` on at which one of `strings` completes in the generated text; with
        `after` (the token that completed the stop_after marker) only text after the marker counts. Decodes only
        a window of trailing tokens per check."""
        def text(lo: int, hi: int) -> str:  # tokens lo..hi decoded; cut after the marker if the span reaches it
            if after is not None and lo <= after:
                t = self.tokenizer.decode(tokens[max(0, after + 1 - self.marker_window):hi + 1])
                k = t.find(self.stop_after)
                return t[k + len(self.stop_after):] if k >= 0 else t
            return self.tokenizer.decode(tokens[max(0, lo):hi + 1])

        if not any(x in text(start + 1 - window, len(tokens) - 1) for x in strings):
            return None
        return next((i for i in range(start, len(tokens)) if any(x in text(i + 1 - window, i) for x in strings)),
                    None)


def generate(model: Transformer, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int | Sequence[int],
             temperature: float = 1.0, top_p: float = 1.0, stop_token_ids: Sequence[int] = (),
             stop_strings: Sequence[str] = (), stop_after: str | None = None, tokenizer=None, seed: int = 0,
             progress: bool = False, max_batch_size: int | None = None) -> list[Sample]:
    """Sample n continuations of every prompt (token ids, no padding needed); sample j of prompt i is at i*n + j.

    Each Sample has the generated ids (a stop token or the tokens completing a stop string included), the
    logprob of each under log_softmax(logits / temperature) (temperature 0: greedy, unscaled logprobs), and
    finish_reason "stop" or "length" (max_new_tokens: one for all, one per prompt, or one per sample). With a
    tokenizer, LM-head rows >= len(tokenizer) are never sampled and get no probability mass (the trainer
    must mask them the same way); stop strings need the tokenizer and are matched in the generated text only,
    and with stop_after only in the text after the first occurrence of that marker (e.g. "</answer>" only after
    "</think>"). The noise depends on (seed, i, j, step) only, not on batching, pool size or admission order (on
    CUDA, kernels chosen per batch size can still move logits in the last bits). max_batch_size caps the
    concurrent sequences (default MAX_BATCH). Weights and train/eval mode are left as they are.

    A one-shot Sampler: its pool and graphs are dropped afterwards. A trainer keeps one Sampler across steps."""
    sampler = Sampler(model, max_batch_size=max(max_batch_size or MAX_BATCH, 1))
    samples = sampler.generate(prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               stop_token_ids=stop_token_ids, stop_strings=stop_strings, stop_after=stop_after,
                               tokenizer=tokenizer, seed=seed, progress=progress, max_batch_size=max_batch_size)
    if sampler.device.type == "cuda":
        del sampler
        torch.cuda.empty_cache()
    return samples
