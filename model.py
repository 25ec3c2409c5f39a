"""A hand-written Qwen2 / Qwen3 / Llama-3 decoder and a KV-cached sampler for RL rollouts (issues 3, 12).

The decoder reproduces transformers' Qwen2ForCausalLM / Qwen3ForCausalLM / LlamaForCausalLM and keeps their
parameter names, so Hugging Face checkpoints load as they are; the architecture differences are data
(ModelConfig), not subclasses.
`generate` samples from the very model object the trainer optimises (SPEC section 6 needs the sampler's
logprobs under the trainer's temperature): no weight copy, no second engine.
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


@dataclass
class Sample:
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"


class KVCache:
    """Preallocated, slot-major: slot s holds one sequence's keys and values at positions 0..len-1.
    Besides the tensors it holds the context of the current forward (which slot and position each new token
    writes), as nano-vllm does, so the decoder layers only call attend()."""

    def __init__(self, config: ModelConfig, slots: int, max_len: int, device, dtype):
        shape = (config.num_layers, slots, max_len, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.flash = (flash_attn_with_kvcache is not None and torch.device(device).type == "cuda"
                      and dtype in (torch.float16, torch.bfloat16))

    def prefill(self, slot, pos, cu_seqlens: list[int]):
        """Packed ragged prompts: token t lands in (slot[t], pos[t]); prompt i is tokens cu[i]:cu[i+1]."""
        self.decoding, self.slot, self.pos, self.bounds = False, slot, pos, cu_seqlens
        self.cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=slot.device)
        self.max_seqlen = max(b - a for a, b in zip(cu_seqlens, cu_seqlens[1:]))

    def decode(self, pos, length: int):
        """One token for each of slots 0..B-1 at pos[b]; attend over keys 0..length-1 (static for CUDA graphs)."""
        self.decoding, self.pos, self.length = True, pos, length

    def attend(self, layer, q, k, v):
        kc, vc = self.k[layer], self.v[layer]
        q, k, v = (t.to(kc.dtype) for t in (q, k, v))  # under autocast, rope leaves q, k in fp32
        if not self.decoding:
            kc[self.slot, self.pos], vc[self.slot, self.pos] = k[0], v[0]
            if self.flash:
                return flash_attn_varlen_func(q[0], k[0], v[0], self.cu, self.cu, self.max_seqlen,
                                              self.max_seqlen, causal=True)[None]
            ys = [F.scaled_dot_product_attention(*(t[:, a:b].transpose(1, 2) for t in (q, k, v)),
                                                 is_causal=True, enable_gqa=True)
                  for a, b in zip(self.bounds, self.bounds[1:])]
            return torch.cat(ys, 2).transpose(1, 2)
        B, _, H, D = q.shape
        if self.flash:  # writes k, v at cache_seqlens and attends over 0..pos
            return flash_attn_with_kvcache(q, kc[:B], vc[:B], k, v, cache_seqlens=self.pos.int(), causal=True)
        rows = torch.arange(B, device=q.device)
        kc[rows, self.pos], vc[rows, self.pos] = k[:, 0], v[:, 0]
        # grouped-query decode: the query heads sharing a kv head act as that head's query rows, no kv repeat
        kvh = kc.shape[2]
        mask = (torch.arange(self.length, device=q.device) <= self.pos[:, None])[:, None, None]
        y = F.scaled_dot_product_attention(q.reshape(B, kvh, H // kvh, D), kc[:B, :self.length].transpose(1, 2),
                                           vc[:B, :self.length].transpose(1, 2), attn_mask=mask)
        return y.reshape(B, 1, H, D)


def _hash(x):
    """32-bit integer mix (uint32 values held in int64; every product stays below 2**63, so no overflow)."""
    for _ in range(2):
        x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def _gumbel(seed: int, sample_ids, steps, vocab: int):
    """Gumbel noise that is a pure function of (seed, sample id, step, token id), so a sample's tokens do not
    depend on which other samples share its batch, how many slots there are, or the device."""
    h = _hash(_hash(_hash(torch.full_like(sample_ids, seed & 0xFFFFFFFF)) ^ sample_ids) ^ steps)
    u = ((_hash(h[:, None] ^ torch.arange(vocab, device=h.device)) >> 8).float() + 0.5) / 2 ** 24
    return -torch.log(-torch.log(u))


def sample_tokens(logits, temperature: float, top_p: float, seed: int, sample_ids, steps):
    """Next tokens and their logprobs log_softmax(logits / T) (unscaled logits for T = 0, greedy).
    top-p truncates what may be drawn; the returned logprob stays that of the untruncated T-scaled
    distribution, which is what the trainer recomputes."""
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


@cache
def _announce(backend: str):
    print(f"model.py: attention via {backend}", file=sys.stderr)


def _num_slots(config: ModelConfig, wanted: int, max_len: int, device, dtype) -> int:
    """CPU: one slot per wanted sequence. CUDA: as many as 90% of the free memory holds, after a reserve for
    the prefill activations and the per-slot sampling workspace (fp32 logits and int64 noise over the vocab)."""
    if device.type != "cuda":
        return wanted
    kv = 2 * config.num_layers * max_len * config.num_kv_heads * config.head_dim * dtype.itemsize
    per_slot = kv + 32 * config.vocab_size
    reserve = PREFILL_TOKENS * (3 * config.intermediate_size + 6 * config.hidden_size) * dtype.itemsize + 2 ** 30
    # memory PyTorch's allocator holds but does not use (the last call's cache, the trainer's activations) is free too
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    fit = int((0.9 * free - reserve) // per_slot)
    if fit < 1:
        raise RuntimeError(f"not enough free GPU memory for one {max_len}-token sequence; "
                           f"lower max_new_tokens or the prompt length")
    return min(wanted, fit)


class _Rollout:
    """One generate() call: a slot-major KV cache, a queue of samples, and a decode loop that refills finished
    slots from the queue every SYNC_EVERY steps (continuous batching). Sample s is prompt s // n."""

    def __init__(self, model, prompts, n, max_new_tokens, temperature, top_p, stop_token_ids, stop_strings,
                 tokenizer, seed, max_batch_size):
        w = model.embed_tokens.weight
        self.model, self.prompts, self.device = model, prompts, w.device
        # an fp32 model run under autocast computes (and caches keys/values) in the autocast dtype
        dtype = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype
        self.max_new = max_new_tokens  # one per prompt
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.stop_ids, self.stop_strings, self.tokenizer = set(stop_token_ids), list(stop_strings), tokenizer
        # a stop string ends within this many trailing tokens (every token decodes to >= 1 byte)
        self.stop_window = max((len(s.encode()) for s in self.stop_strings), default=0) + 4
        self.vocab = len(tokenizer) if tokenizer is not None else model.config.vocab_size
        self.max_len = max(len(p) + m for p, m in zip(prompts, self.max_new)) + SYNC_EVERY
        self.queue = deque(range(len(prompts) * n))
        self.n, self.results = n, [None] * len(self.queue)
        slots = _num_slots(model.config, min(len(self.queue), max_batch_size or len(self.queue)), self.max_len,
                           self.device, dtype)
        self.cache = KVCache(model.config, slots, self.max_len, self.device, dtype)
        _announce("flash-attn" if self.cache.flash else "torch SDPA (flash-attn not importable or not applicable)")
        # device state per slot: last token, its position, sample id, tokens generated so far
        self.tok, self.pos, self.sid, self.step = (torch.zeros(slots, dtype=torch.long, device=self.device)
                                                   for _ in range(4))
        self.out_tok = torch.zeros(slots, max(self.max_new) + SYNC_EVERY, dtype=torch.long, device=self.device)
        self.out_lp = torch.zeros(slots, max(self.max_new) + SYNC_EVERY, device=self.device)
        # host mirror: sample held by each slot (None = free), its position and tokens so far
        self.slot_sample, self.host_pos = [None] * slots, [0] * slots
        self.gen_tok, self.gen_lp = [[] for _ in range(slots)], [[] for _ in range(slots)]
        self.graphs, self.pool = {}, None

    def run(self, progress: bool) -> list[Sample]:
        from tqdm import tqdm
        bar, t0, kept = tqdm(total=len(self.results), unit="seq", desc="generate", disable=not progress), time.time(), 0
        while self.queue or any(s is not None for s in self.slot_sample):
            self._admit()
            hi = 1 + max(i for i, s in enumerate(self.slot_sample) if s is not None)
            self._decode_block(hi)
            done = self._harvest(hi)
            kept += sum(len(self.results[s].tokens) for s in done)
            bar.update(len(done))
            bar.set_postfix(tok_s=f"{kept / (time.time() - t0):.0f}")
        bar.close()
        return self.results

    def _logits(self, hidden):
        logits = self.model.lm_head(hidden).float()
        logits[:, self.vocab:] = -math.inf  # padded LM-head rows are untrained: never sample them
        return logits

    def _admit(self):
        """Fill free slots from the queue; the n samples of a prompt share one prefill."""
        free = [i for i, s in enumerate(self.slot_sample) if s is None]
        groups, budget = [], PREFILL_TOKENS  # [prompt index, [(slot, sample), ...]]
        while free and self.queue:
            p = self.queue[0] // self.n
            if not groups or groups[-1][0] != p:
                if groups and len(self.prompts[p]) > budget:
                    break
                budget -= len(self.prompts[p])
                groups.append([p, []])
            groups[-1][1].append((free.pop(0), self.queue.popleft()))
        if groups:
            self._prefill(groups)

    def _prefill(self, groups):
        dev, cache = self.device, self.cache
        lens = [len(self.prompts[p]) for p, _ in groups]
        cu = [0]
        for t in lens:
            cu.append(cu[-1] + t)
        ids = torch.tensor([t for p, _ in groups for t in self.prompts[p]], device=dev)
        pos = torch.cat([torch.arange(t, device=dev) for t in lens])
        first = torch.tensor([m[0][0] for _, m in groups], device=dev)
        cache.prefill(first.repeat_interleave(torch.tensor(lens, device=dev)), pos, cu)
        hidden = self.model(ids[None], pos[None], cache)[0, torch.tensor(cu[1:], device=dev) - 1]
        for (p, members), t in zip(groups, lens):  # fork the prompt's keys/values into its siblings' slots
            if len(members) > 1:
                dst = torch.tensor([s for s, _ in members[1:]], device=dev)
                cache.k[:, dst, :t] = cache.k[:, members[0][0]:members[0][0] + 1, :t]
                cache.v[:, dst, :t] = cache.v[:, members[0][0]:members[0][0] + 1, :t]
        flat = [(g, s, sample) for g, (_, members) in enumerate(groups) for s, sample in members]
        row = torch.tensor([g for g, _, _ in flat], device=dev)
        slot = torch.tensor([s for _, s, _ in flat], device=dev)
        sid = torch.tensor([sample for _, _, sample in flat], device=dev)
        token, logp = sample_tokens(self._logits(hidden)[row], self.temperature, self.top_p, self.seed, sid,
                                    torch.zeros_like(sid))
        self.out_tok[slot, 0], self.out_lp[slot, 0], self.tok[slot], self.sid[slot] = token, logp, token, sid
        self.pos[slot], self.step[slot] = torch.tensor([lens[g] for g, _, _ in flat], device=dev), 1
        for g, s, sample in flat:
            self.slot_sample[s], self.host_pos[s] = sample, lens[g]
            self.gen_tok[s], self.gen_lp[s] = [], []

    def _forward_decode(self, B: int, L: int):
        self.cache.decode(self.pos[:B], L)
        hidden = self.model(self.tok[:B, None], self.pos[:B, None], self.cache)[:, 0]
        return sample_tokens(self._logits(hidden), self.temperature, self.top_p, self.seed, self.sid[:B],
                             self.step[:B])

    def _decode(self, B: int, L: int):
        """One decode step for slots 0..B-1; on CUDA a graph per (B, L) bucket replaces ~10 launches per layer."""
        if self.device.type != "cuda":
            return self._forward_decode(B, L)
        if (B, L) not in self.graphs:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up outside the graph; its cache writes are rewritten identically
                self._forward_decode(B, L)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward_decode(B, L)
            self.graphs[B, L] = graph, out
        graph, out = self.graphs[B, L]
        graph.replay()
        return out

    def _decode_block(self, hi: int):
        """SYNC_EVERY decode steps without a host sync. Buckets: B a power of two >= hi, L a power of two
        covering every position the block reaches, so few graphs are captured."""
        slots = len(self.slot_sample)
        B = min(slots, 1 << (hi - 1).bit_length())
        L = min(self.max_len, max(256, 1 << (max(self.host_pos[:B]) + SYNC_EVERY).bit_length()))
        rows = torch.arange(B, device=self.device)
        for _ in range(SYNC_EVERY):
            token, logp = self._decode(B, L)
            self.out_tok[rows, self.step[:B]], self.out_lp[rows, self.step[:B]] = token, logp
            self.tok[:B], self.pos[:B], self.step[:B] = token, self.pos[:B] + 1, self.step[:B] + 1
        for s in range(B):
            self.host_pos[s] += SYNC_EVERY

    def _harvest(self, hi: int) -> list[int]:
        """Copy the new tokens to the host (the one sync per block), end samples on a stop id, a stop string or
        max_new_tokens (the stop token is kept), and free their slots."""
        start = torch.tensor([len(self.gen_tok[s]) for s in range(hi)], device=self.device)
        idx = (start[:, None] + torch.arange(SYNC_EVERY + 1, device=self.device)).clamp(max=self.out_tok.shape[1] - 1)
        new_tok = self.out_tok[:hi].gather(1, idx).tolist()
        new_lp = self.out_lp[:hi].gather(1, idx).tolist()
        done, free = [], []
        for s in range(hi):
            sample = self.slot_sample[s]
            if sample is None:
                free.append(s)
                continue
            old = len(self.gen_tok[s])
            count = self.host_pos[s] - len(self.prompts[sample // self.n]) - old + 1
            self.gen_tok[s] += new_tok[s][:count]
            self.gen_lp[s] += new_lp[s][:count]
            end = self._find_end(self.gen_tok[s], old, self.max_new[sample // self.n])
            if end is not None:
                last, reason = end
                self.results[sample] = Sample(self.gen_tok[s][:last + 1], self.gen_lp[s][:last + 1], reason)
                self.slot_sample[s] = None
                done.append(sample)
                free.append(s)
        free += [s for s in range(hi, len(self.slot_sample)) if self.slot_sample[s] is None]  # decoded too (B >= hi)
        if free:  # idle slots keep decoding garbage from position 0 until refilled: keeps positions in range
            f = torch.tensor(free, device=self.device)
            self.tok[f], self.pos[f], self.step[f] = 0, 0, 0
            for s in free:
                self.host_pos[s] = 0
        return done

    def _find_end(self, tokens: list[int], old: int, max_new: int):
        """(index of the last kept token, finish reason) for the first end among tokens[old:], or None."""
        first_string_end = None
        if self.stop_strings:
            window = self.tokenizer.decode(tokens[max(0, old - self.stop_window):])
            if any(s in window for s in self.stop_strings):
                for i in range(old, len(tokens)):
                    text = self.tokenizer.decode(tokens[max(0, i + 1 - self.stop_window):i + 1])
                    if any(s in text for s in self.stop_strings):
                        first_string_end = i
                        break
        for i in range(old, len(tokens)):
            if tokens[i] in self.stop_ids or i == first_string_end:
                return i, "stop"
            if i == max_new - 1:
                return i, "length"
        return None


def generate(model: Transformer, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int | Sequence[int],
             temperature: float = 1.0, top_p: float = 1.0, stop_token_ids: Sequence[int] = (),
             stop_strings: Sequence[str] = (), tokenizer=None, seed: int = 0, progress: bool = False,
             max_batch_size: int | None = None) -> list[Sample]:
    """Sample n continuations of every prompt (token ids, no padding needed); sample j of prompt i is at i*n + j.

    Each Sample has the generated ids (a stop token or the tokens completing a stop string included), the
    logprob of each under log_softmax(logits / temperature) (temperature 0: greedy, unscaled logprobs), and
    finish_reason "stop" or "length" (max_new_tokens: one for all prompts, or one per prompt). With a
    tokenizer, LM-head rows >= len(tokenizer) are never sampled and get no probability mass (the trainer
    must mask them the same way); stop strings need the tokenizer and are matched in the generated text only.
    The noise depends on (seed, i, j) only, not on batching (on CUDA, kernels chosen per batch size can still move
    logits in the last bits). max_batch_size caps the concurrent sequences
    (default: all of them, or as many as GPU memory holds). Weights and train/eval mode are left as they are."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer: pass tokenizer=...")
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if min(limits) < 1 or len(limits) != len(prompts) or n < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("need max_new_tokens >= 1 (an int or one per prompt), n >= 1, temperature >= 0 "
                         "and 0 < top_p <= 1")
    with torch.inference_mode():
        return _Rollout(model, prompts, n, limits, temperature, top_p, stop_token_ids, stop_strings,
                        tokenizer, seed, max_batch_size).run(progress)
