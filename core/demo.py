"""The demo models, in the official checkpoint format (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json), loaded through the normal loader:

- the trained demo (`trained_demo_path()`, bundled in core/demo_model/, 3 layers + an MTP layer, 7 MB): made by
  scripts/train_demo.py on CPU from a synthetic corpus in the V3.2 chat encoding. It answers short questions (the form
  right, the facts often not), thinks in <think> blocks when asked to, calls a weather tool in DSML (the right
  city in about 8 of 10 questions about cities it knows without thinking, 4-5 of 10 with thinking), and its MTP layer
  drafts well on that domain. `dsv32 serve` without --model and `dsv32 demo` use it, so a new user sees the engine
  work without downloading anything;
- `make_demo_checkpoint`: a random-weight model with a byte-level BPE tokenizer carrying the DeepSeek-V3.2 special
  tokens (its text is gibberish), for tests that need any model with a tokenizer."""

from __future__ import annotations

import json
import math
import os

import torch

from dsv32.core.config import ModelConfig
from dsv32.core.model.specs import weight_specs

TRAINED_DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")
TRAINED_DEMO_NAME = "dsv32-demo"


def trained_demo_path() -> str:
    """The bundled trained demo model's directory (read-only package data)."""
    if not os.path.isfile(os.path.join(TRAINED_DEMO_DIR, "model.safetensors")):
        raise FileNotFoundError(f"the trained demo model is missing from {TRAINED_DEMO_DIR}: reinstall dsv32, or "
                                "regenerate it with `python scripts/train_demo.py`")
    return TRAINED_DEMO_DIR


DEMO_CONFIG = {
    "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "vocab_size": 512,
    "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 64,
    "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 8,
    "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
    "norm_topk_prob": True, "first_k_dense_replace": 1, "index_n_heads": 32, "index_head_dim": 32,
    "index_topk": 64, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "float32",
}


def make_demo_checkpoint(path: str, seed: int = 0) -> str:
    """Write the demo checkpoint to `path` (idempotent: an existing complete one is kept). Returns path."""
    from safetensors.torch import save_file

    done = os.path.join(path, "model.safetensors")
    if os.path.isfile(done) and os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(path, exist_ok=True)
    cfg = ModelConfig.from_dict(DEMO_CONFIG, "demo config")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, spec in weight_specs(cfg).items():
        if spec.kind == "experts":
            E, I, Hd = spec.shape
            for j in range(E):
                for proj, shape in (("gate_proj", (I, Hd)), ("up_proj", (I, Hd)), ("down_proj", (Hd, I))):
                    tensors[f"{name}.{j}.{proj}.weight"] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        elif len(spec.shape) == 2:
            scale = 1.0 if "embed_tokens" in name else 1 / math.sqrt(spec.shape[1])
            tensors[name] = torch.randn(spec.shape, generator=g) * scale
        elif name.endswith("bias"):
            tensors[name] = torch.randn(spec.shape, generator=g) * 0.1
        else:
            tensors[name] = torch.rand(spec.shape, generator=g) + 0.5
    _write_tokenizer(path, DEMO_CONFIG["vocab_size"])
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 1.0, "top_p": 0.95}, f)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(DEMO_CONFIG, f, indent=2)
    tmp = done + ".tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, done)  # written last and atomically: a crash never leaves a checkpoint that looks complete
    return path

# DeepSeek-V3.2's special tokens (protocol.md §2). The demo's ids differ from the real tokenizer's
# (its vocabulary is 512 tokens), but the strings are the same, so encoders and parsers work unchanged.
SPECIAL_TOKENS = [
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<think>", "</think>", "<｜User｜>",
    "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁sep｜>", "｜DSML｜",
]
# <think>/</think> and ｜DSML｜ survive skip_special_tokens in the real tokenizer (added, not special).
NON_SKIPPED = {"<think>", "</think>", "｜DSML｜"}

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Hello! I am DeepSeek, a helpful assistant.\n"
    "What is the weather in Paris today? It is sunny and warm, about 24 degrees.\n"
    "def add(a, b):\n    return a + b\n# numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000\n"
    '<function_calls> <invoke name="get_weather"> <parameter name="city" string="true">Paris</parameter>\n'
    '</invoke> </function_calls> {"city": "Paris", "unit": "celsius"} [1, 2, 3] true false null\n'
    "The user asks a question; the assistant thinks, then answers in plain words.\n"
    "Sparse attention selects the most relevant tokens with a lightning indexer.\n"
)


def build_tokenizer(vocab_size: int, corpus: list[str] | None = None, spaces_apart: bool = False):
    """Deterministic byte-level BPE over a small built-in corpus (or the given texts). Skippable special tokens take
    the first ids (BOS 0, EOS 1, ...); <think>, </think> and ｜DSML｜ are added as normal tokens at the end of the
    vocabulary. spaces_apart: every whitespace character is a token of its own, so a word has the same tokens after a
    space as after a quote or '>' (the demo model copies "in Paris?" into `string="true">Paris<`)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    skipped = [t for t in SPECIAL_TOKENS if t not in NON_SKIPPED]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if spaces_apart:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
                                                     tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(NON_SKIPPED), special_tokens=skipped,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus if corpus is not None else [_CORPUS] * 4, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in SPECIAL_TOKENS if t in NON_SKIPPED])
    return tok


def _write_tokenizer(path: str, vocab_size: int) -> None:
    tok = build_tokenizer(vocab_size)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"add_bos_token": False, "add_eos_token": False, "bos_token": SPECIAL_TOKENS[0],
                   "eos_token": SPECIAL_TOKENS[1], "pad_token": SPECIAL_TOKENS[1], "model_max_length": 4096,
                   "tokenizer_class": "LlamaTokenizerFast"}, f, indent=2)
