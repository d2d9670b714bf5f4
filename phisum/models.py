"""Build a profile's base model and tokenizer (from the Hub, the embedded GGUF cache, or in
code for tests), and speed up CPU inference."""

from __future__ import annotations

import logging
import types

import torch

from phisum.profiles import PROFILES, TINY_BASE_ID, Profile

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(profile: Profile, device: str) -> torch.dtype:
    dtype = DTYPES[profile.dtype]
    # phi-2 overflows in fp16, so a GPU without bf16 runs fp32, never fp16.
    if dtype == torch.bfloat16 and device == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float32
    return dtype


def quantization_config(bits: int | None, compute_dtype: torch.dtype):
    if not bits:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be 4 or 8 bits, got {bits}")


def model_path(profile: Profile, progress: bool = True) -> str:
    """Where from_pretrained should read the base model from."""
    if profile.loader == "gguf-cache":
        from phisum.embedded import ensure_cache

        return str(ensure_cache(progress=progress))
    if profile.loader == "tiny":
        raise ValueError(f"the {profile.name} profile is built in code; use load_base()")
    return profile.base_model


def load_base(profile: Profile, dtype: torch.dtype | str | None = None, bits: int | None = None,
              device: str | None = None, progress: bool = True):
    """Return (model, tokenizer) in eval mode, tokenizer set up for batched generation."""
    device = device or pick_device()
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    dtype = dtype or default_dtype(profile, device)
    if bits and not profile.quantizable:
        raise ValueError(f"the {profile.name} profile cannot load quantized; save it (models.save_tiny) and "
                         "load the folder with from_pretrained")
    if profile.loader == "tiny":
        model, tokenizer = build_tiny_model().to(device=device, dtype=dtype), build_tiny_tokenizer()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = model_path(profile, progress=progress)
        fast = profile.loader == "gguf-cache"  # the cache's tokenizer.json loads faster directly
        tokenizer = load_embedded_tokenizer(path) if fast else AutoTokenizer.from_pretrained(path)
        kwargs = {"dtype": dtype}
        quant = quantization_config(bits, dtype)
        if quant is not None:
            kwargs["quantization_config"] = quant
            kwargs["device_map"] = {"": 0} if device == "cuda" else "cpu"
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if quant is None:
            model.to(device)
    prepare_tokenizer(tokenizer)
    # peft records model.name_or_path as the adapter's base: the profile's identity,
    # not a cache folder, so adapters are portable and check_adapter can verify them.
    model.config.name_or_path = profile.base_model
    model.name_or_path = profile.base_model
    model.eval()
    return model, tokenizer


def load_embedded_tokenizer(path: str):
    """The cache's tokenizer.json straight into the fast tokenizer: faster than
    AutoTokenizer's GemmaTokenizer, which parses the large file twice in
    Python. Encodings are identical (checked in tests/test_embedded.py)."""
    import json
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    config = json.loads((Path(path) / "tokenizer_config.json").read_text())
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")
               if isinstance(config.get(k), str)}
    return PreTrainedTokenizerFast(tokenizer_file=str(Path(path) / "tokenizer.json"), **special)


def prepare_tokenizer(tokenizer) -> None:
    # Left padding keeps every prompt's last token next to the generated ones.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


# ----------------------------------------------------------- the tiny test model

def build_tiny_tokenizer():
    """Byte-level tokenizer: 256 byte tokens plus <|endoftext|>; no download, no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=10**6,  # the backend truncates to the context itself, with a notice
    )


def build_tiny_model(seed: int = 0, layers: int = 2):
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=PROFILES["tiny"].context_length,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=256,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = PhiForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.config.name_or_path = TINY_BASE_ID
    model.name_or_path = TINY_BASE_ID
    model.generation_config.pad_token_id = 256
    model.generation_config.eos_token_id = 256
    return model


def save_tiny(path):
    """Write the tiny model and tokenizer to a folder (for from_pretrained paths:
    bitsandbytes quantization, subprocess training)."""
    from pathlib import Path

    path = Path(path)
    build_tiny_model().save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


# ----------------------------------------------------------- CPU fast linear

def _packed_forward(self, x):
    return torch.ops.mkldnn._linear_pointwise(x, self._phisum_packed, self.bias, "none", [None], "")


def pack_linear_weights(model) -> int:
    """Pre-pack every bf16 nn.Linear weight into oneDNN's blocked layout.

    At batch 1 a decode step is a chain of matrix-vector products; F.linear
    re-lays out the weight on each call. The prepacked kernel gives bit-identical
    results faster (benchmarks/generation.py measures it). Inference only: the packed copy does not follow
    later weight updates, so never call this on a model being trained. Costs one
    extra copy of the weights. Returns the number of layers packed.
    """
    if not (hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()):
        return 0
    count = 0
    for module in model.modules():
        if (type(module) is torch.nn.Linear and module.weight.device.type == "cpu"
                and module.weight.dtype == torch.bfloat16 and not hasattr(module, "_phisum_packed")):
            with torch.no_grad():
                module._phisum_packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), 1)
            module.forward = types.MethodType(_packed_forward, module)
            count += 1
    count += _fuse_gemma_norms(model)
    return count


CPU_ATTENTION = "phisum_cpu_sdpa"


def _cpu_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa attention, with grouped-query attention laid out for the CPU kernel.

    Models whose query heads share key/value heads (Gemma 3: four per pair) reach torch's CPU
    kernel two ways in transformers' `sdpa`: with a padding mask, a decode step's query heads
    are folded onto their key/value head (one small product per pair); without one (rows of
    equal length: one click's base and adapter rows, a chat's single row) it passes
    `enable_gqa=True`, which the CPU kernel runs many times slower for a single query token.
    Here a decode step always folds, and a prompt always uses `enable_gqa` (the other way copies
    every key and value head per query head first). Anything else goes to transformers' own."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, length, dim = query.shape
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = (groups > 1 and query.device.type == "cpu" and not dropout and not kwargs.get("output_attentions")
             and all(kwargs.get(k) is None for k in ("softcap", "position_bias", "cache"))
             and (attention_mask is None or attention_mask.shape[1] == 1)
             and (length == 1 or attention_mask is not None or (causal and key.shape[2] == length)))
    if not plain:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if length == 1:
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(batch, heads // groups, groups, dim), key, value, attn_mask=attention_mask, scale=scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, is_causal=attention_mask is None, scale=scaling,
            enable_gqa=True)
    return out.reshape(batch, heads, length, value.shape[-1]).transpose(1, 2).contiguous(), None


def use_cpu_attention(model) -> bool:
    """Switch a CPU model with grouped-query attention that uses transformers' sdpa to `_cpu_sdpa`.
    Results are the same either way (fp32 tokens identical, tested); only the kernel layout changes."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_attention_heads", 0)
    if (model.config._attn_implementation != "sdpa" or model.device.type != "cpu"
            or getattr(config, "num_key_value_heads", None) in (None, heads)):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CPU_ATTENTION, _cpu_sdpa)
    AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)
    model.set_attn_implementation(CPU_ATTENTION)
    return True


def _fused_gemma_norm(self, x):
    return (torch.nn.functional.rms_norm(x.float(), self._phisum_shape, None, self.eps) * self._phisum_scale).type_as(x)


def _fuse_gemma_norms(model) -> int:
    """Gemma3RMSNorm computes (1 + w) and the mean-square in separate float ops for
    each of ~109 norms per token; one fused rms_norm with a precomputed scale gives
    identical tokens and fewer ops per decode step."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == "Gemma3RMSNorm" and not hasattr(module, "_phisum_scale"):
            module._phisum_scale = (1.0 + module.weight.detach().float())
            module._phisum_shape = (module.weight.shape[0],)
            module.forward = types.MethodType(_fused_gemma_norm, module)
            count += 1
    return count
