"""Trains dsv32's demo model: a tiny DeepSeek-V3.2-architecture model with an MTP layer, on a synthetic corpus written
in the V3.2 chat encoding (short answers; <think> blocks in thinking mode; DSML tool calls for weather questions when a
weather tool is offered, and an answer from the tool's result). CPU only, deterministic; writes the checkpoint that
`dsv32 serve` serves when no --model is given (core/demo_model/).

    python scripts/train_demo.py [--out core/demo_model] [--steps 1800] [--check]

The result is bit for bit the same on every run with the same torch version and thread count (2 by default: the
reductions' order depends on it); --check trains again into a temporary directory and compares the files.
The main model is transformers' DeepseekV32 (the oracle the engine is tested against); the MTP layer is the official
one: h' = Block(eh_proj([enorm(Emb(t_{i+1})) ; hnorm(h_i)])), logits = lm_head(shared_head.norm(h')), trained to
predict t_{i+2} (loss weight MTP_WEIGHT), with Block a transformers DeepseekV32DecoderLayer at index L.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import random
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SEED = 20261203
VOCAB = 1024
MTP_WEIGHT = 0.5
LR = 1.5e-3  # peak (warm-up 100 steps, cosine to a tenth)
PROMPT_WEIGHT = 0.2  # loss weight of the prompt's tokens relative to the reply's
TOKENIZER_SAMPLES = 4000  # the corpus's first conversations train the tokenizer
MAX_LEN = 800  # tokens per training sequence (longer samples are dropped; the tool prompts are ~400-700)

CONFIG = dict(
    vocab_size=VOCAB, hidden_size=128, intermediate_size=320, moe_intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2,
    topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, index_n_heads=8,
    index_head_dim=32, index_topk=1024, max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=0,
    eos_token_id=1, pad_token_id=1, tie_word_embeddings=False,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
)

# ---- the corpus ------------------------------------------------------------------------------------------------------
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "China": "Beijing",
    "Egypt": "Cairo", "Canada": "Ottawa", "Brazil": "Brasilia", "Kenya": "Nairobi", "Peru": "Lima", "India": "New Delhi",
    "Russia": "Moscow", "Norway": "Oslo", "Sweden": "Stockholm", "Greece": "Athens", "Mexico": "Mexico City",
    "Australia": "Canberra", "Portugal": "Lisbon", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin",
    "Chile": "Santiago", "Turkey": "Ankara", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Cuba": "Havana",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Argentina": "Buenos Aires",
}
CITIES = sorted(set(CAPITALS.values()) | {"London", "New York", "Shanghai", "Sydney", "Seoul", "Hangzhou", "Boston",
                                          "Chicago", "Toronto", "Munich", "Barcelona", "Istanbul", "Mumbai", "Dubai",
                                          "Singapore", "Zurich", "Amsterdam", "Prague", "Lagos", "Osaka", "San Francisco",
                                          "Los Angeles", "Seattle", "Hong Kong", "Cape Town", "Rio de Janeiro",
                                          "Kuala Lumpur", "Melbourne", "Vancouver", "Shenzhen"})
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]
SYLLABLES = ["ka", "lo", "ri", "ve", "no", "ta", "mi", "sa", "do", "ber", "lin", "ar", "on", "zu", "pe", "gra", "hel",
             "mon", "tor", "vi"]


def _invented_city(rng: random.Random) -> str:
    """A made-up city name: the tool call must copy it from the question (no prior to fall back on)."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
          "a tomato": "red", "an orange": "orange"}
NAME = "dsv32-demo"

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a helpful assistant. Use the tools when they help.",
                  "You are dsv32-demo, a helpful assistant."]


def _weather_tool(rng: random.Random) -> tuple[dict, str, str]:
    """(tool, function name, argument name): the weather tool as clients write it, so the model learns to copy the
    function's and the argument's names from the schema (OpenAI's examples use get_weather / location, with a unit)."""
    name = rng.choice(["get_weather", "get_weather", "get_weather", "get_current_weather"])
    arg = rng.choice(["city", "location", "location"])
    desc = {"city": ["The city name", "The name of the city", "City name, e.g. Paris"],
            "location": ["City and country e.g. Bogot\u00e1, Colombia", "The city and state, e.g. San Francisco, CA",
                         "The location to get the weather for"]}[arg]
    props = {arg: {"type": "string", "description": rng.choice(desc)}}
    if rng.random() < 0.3:
        props["unit"] = {"type": "string", "enum": ["celsius", "fahrenheit"]}
    fn = {"name": name, "description": rng.choice(["Get the current weather in a city",
                                                   "Get current temperature for a given location.",
                                                   "Get the current weather in a given location"]),
          "parameters": {"type": "object", "properties": props, "required": [arg]}}
    if rng.random() < 0.3:
        fn["parameters"]["additionalProperties"] = False
        fn["strict"] = True
    return {"type": "function", "function": fn}, name, arg


def _qa(rng: random.Random) -> tuple[str, str, str]:
    """(question, reasoning, answer) of a plain question."""
    kind = rng.choice(["greet", "who", "capital", "capital", "capital", "capital", "add", "color", "repeat", "repeat",
                       "repeat", "thanks"])
    if kind == "greet":
        q = rng.choice(["Hello!", "Hi", "Hi there!", "Hey", "Good morning!", "Hello, how are you?"])
        return q, "The user greets me. I will greet them back and offer help.", \
            "Hello! I am " + NAME + ", a tiny DeepSeek-V3.2 demo model. How can I help you today?"
    if kind == "who":
        q = rng.choice(["Who are you?", "What is your name?", "What are you?", "Introduce yourself."])
        return q, "The user asks who I am. I am the dsv32 demo model.", \
            "I am " + NAME + ", a tiny model with the DeepSeek-V3.2 architecture. I can answer simple questions, " \
            "think step by step and call tools."
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        q = rng.choice(["What is the capital of {}?", "What's the capital of {}?", "Tell me the capital of {}.",
                        "Which city is the capital of {}?"]).format(country)
        return q, f"The user asks for the capital of {country}. The capital of {country} is {CAPITALS[country]}.", \
            f"The capital of {country} is {CAPITALS[country]}."
    if kind == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        q = rng.choice(["What is {} plus {}?", "What is {} + {}?", "Add {} and {}."]).format(a, b)
        return q, f"The user wants {a} + {b}. {a} + {b} = {a + b}.", f"{a} + {b} = {a + b}."
    if kind == "color":
        thing = rng.choice(sorted(COLORS))
        q = f"What color is {thing}?"
        return q, f"The user asks about the color of {thing}. It is {COLORS[thing]}.", \
            f"{thing[0].upper()}{thing[1:]} is {COLORS[thing]}."
    if kind == "repeat":
        word = rng.choice(CITIES + sorted(CAPITALS) + ["hello", "DeepSeek", "sparse attention", "tool calls"]) \
            if rng.random() < 0.5 else _invented_city(rng)  # copying, the skill the tool calls need
        return f"Say {word}.", f"The user wants me to say {word}.", f"{word}"
    return rng.choice(["Thanks!", "Thank you.", "Thank you very much!"]), \
        "The user thanks me. I will reply politely.", "You are welcome! Ask me anything."


def _sample(rng: random.Random) -> dict:
    """One conversation: messages (the last is the assistant's reply), tools, thinking."""
    thinking = rng.random() < 0.5
    system = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    r = rng.random()
    if r < 0.4:  # a weather question with the tool: call it
        city = rng.choice(CITIES) if rng.random() < 0.6 else _invented_city(rng)
        q = rng.choice(["What is the weather in {}?", "What's the weather like in {} today?", "How is the weather in {}?",
                        "Is it raining in {}?", "Weather in {} please.", "What's the weather in {}?",
                        "Tell me the weather in {}.", "What is the temperature in {}?",
                        "How's the weather in {} right now?"]).format(city)
        tool, name, arg = _weather_tool(rng)
        tools = [tool] + ([TIME_TOOL] if rng.random() < 0.3 else [])
        call = {"type": "function", "function": {"name": name, "arguments": json.dumps({arg: city})}}
        msgs = system + [{"role": "user", "content": q}]
        reply = {"role": "assistant", "content": "", "tool_calls": [call]}
        if thinking:
            reply["reasoning_content"] = f"The user wants the weather in {city}. I will call {name} with {city}."
        if rng.random() < 0.4:  # the call's result is back: answer from it
            cond, temp = rng.choice(CONDITIONS), rng.randrange(-5, 36)
            msgs += [dict(reply, reasoning_content=None),
                     {"role": "tool", "content": json.dumps({"city": city, "condition": cond, "temperature": temp})}]
            reply = {"role": "assistant", "content": f"It is {cond} in {city}, {temp} degrees."}
            if thinking:
                reply["reasoning_content"] = f"The tool says {city} is {cond} at {temp} degrees."
        return {"messages": msgs + [reply], "tools": tools, "thinking": thinking}
    q, reasoning, answer = _qa(rng)
    reply = {"role": "assistant", "content": answer}
    if thinking:
        reply["reasoning_content"] = reasoning
    tools = [_weather_tool(rng)[0] if rng.random() < 0.5 else WEATHER_TOOL] if r < 0.5 else None  # offered, not needed
    return {"messages": system + [{"role": "user", "content": q}, reply], "tools": tools, "thinking": thinking}


def render(sample: dict) -> tuple[str, str]:
    """(prompt, completion) in the V3.2 encoding: what the server sends the model, and the reply it should write."""
    from dsv32.server.encoding.dsv32 import build_prompt

    msgs, tools, thinking = sample["messages"], sample["tools"], sample["thinking"]
    prompt = build_prompt(msgs[:-1], tools=tools, thinking=thinking)
    full = build_prompt(msgs, tools=tools, thinking=thinking, add_generation_prompt=False)
    assert full.startswith(prompt), (prompt, full)
    return prompt, full[len(prompt):]


def corpus(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [render(_sample(rng)) for _ in range(n)]


# ---- the model -------------------------------------------------------------------------------------------------------
def _every_key(hidden_states, q_resid, position_embeddings, attention_mask, position_ids, past_key_values=None):
    B, S, T = attention_mask.shape
    assert T <= CONFIG["index_topk"], "training sequences must be shorter than index_topk"
    return torch.arange(T, dtype=torch.int32).expand(B, S, T)


class Demo(torch.nn.Module):
    """transformers' DeepseekV32 with L + 1 decoder layers: layers 0..L-1 are the model, layer L is the MTP block."""

    def __init__(self):
        super().__init__()
        from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
        from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32RMSNorm

        cfg = DeepseekV32Config(**{**CONFIG, "num_hidden_layers": CONFIG["num_hidden_layers"] + 1})
        self.L = CONFIG["num_hidden_layers"]
        self.lm = DeepseekV32ForCausalLM(cfg)
        H = cfg.hidden_size
        self.enorm, self.hnorm = DeepseekV32RMSNorm(H, cfg.rms_norm_eps), DeepseekV32RMSNorm(H, cfg.rms_norm_eps)
        self.shared_head_norm = DeepseekV32RMSNorm(H, cfg.rms_norm_eps)
        self.eh_proj = torch.nn.Linear(2 * H, H, bias=False)
        # Training sequences are shorter than index_topk, so the indexer selects every causal key (and its top-k gets
        # no gradient): skip its scoring, which is most of a CPU step. Same result as transformers' indexer here.
        for layer in self.lm.model.layers:
            layer.self_attn.indexer.forward = _every_key


    def _layers(self, h, layers, positions):
        from transformers.masking_utils import create_causal_mask

        m = self.lm.model
        mask = create_causal_mask(config=m.config, inputs_embeds=h, attention_mask=None, past_key_values=None,
                                  position_ids=positions, allow_is_causal_skip=False)
        pe = m.rotary_emb(h, position_ids=positions)
        for layer in layers:
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=positions)
        return h

    def forward(self, ids: torch.Tensor):
        """(main logits [B, S, V], MTP logits [B, S-1, V]: position j predicts ids[j + 2])."""
        m = self.lm.model
        B, S = ids.shape
        pos = torch.arange(S)[None].expand(B, S)
        emb = m.embed_tokens(ids)
        h = m.norm(self._layers(emb, m.layers[:self.L], pos))
        x = self.eh_proj(torch.cat([self.enorm(emb[:, 1:]), self.hnorm(h[:, :-1])], dim=-1))
        hm = self.shared_head_norm(self._layers(x, m.layers[self.L:], pos[:, :-1]))
        return self.lm.lm_head(h), self.lm.lm_head(hm)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "embed" in name or "lm_head" in name
                                                             else 1 / math.sqrt(p.shape[-1])))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        # lm_head tied to the embedding while training: a token the attention copies into the residual stream is then
        # already its own logit, which is what copying the city into a tool call needs (held-out tool calls right:
        # 46 % tied vs 39 % untied). The checkpoint stores both tensors (equal), as V3.2's untied layout.
        self.lm.lm_head.weight = self.lm.model.embed_tokens.weight

    def save(self, out: str, tokenizer) -> None:
        """The official layout: transformers' names for layers 0..L (layer L = the MTP block, per-expert tensors),
        plus the MTP layer's enorm / hnorm / eh_proj / shared_head.norm; config with L layers and one NextN layer."""
        from safetensors.torch import load_file, save_file

        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.lm.save_pretrained(tmp)
            tensors = load_file(os.path.join(tmp, "model.safetensors"))
        p = f"model.layers.{self.L}."
        tensors.update({p + "enorm.weight": self.enorm.weight, p + "hnorm.weight": self.hnorm.weight,
                        p + "eh_proj.weight": self.eh_proj.weight, p + "shared_head.norm.weight":
                        self.shared_head_norm.weight})
        tensors["lm_head.weight"] = self.lm.model.embed_tokens.weight  # (tied: save_pretrained may drop one of them)
        tensors = {k: v.detach().float().contiguous().clone() for k, v in sorted(tensors.items())}
        save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        config = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", **CONFIG,
                  "num_nextn_predict_layers": 1, "torch_dtype": "float32"}
        with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        with open(os.path.join(out, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95}, f)
        tokenizer.save(os.path.join(out, "tokenizer.json"))
        from dsv32.core.demo import SPECIAL_TOKENS

        with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"add_bos_token": False, "add_eos_token": False, "bos_token": SPECIAL_TOKENS[0],
                       "eos_token": SPECIAL_TOKENS[1], "pad_token": SPECIAL_TOKENS[1], "model_max_length": 4096,
                       "tokenizer_class": "LlamaTokenizerFast"}, f, indent=2)


def tokenizer(pairs: list[tuple[str, str]]):
    """The demo's BPE over the corpus's first TOKENIZER_SAMPLES conversations, every space a token of its own (a
    city has the same tokens in the question, the reasoning and the tool call's argument: copying it is then one
    skill, not a per-city mapping between "ĠParis" and "P", "aris": `probe` went from 58 % / 26 % right (without /
    with thinking) to 82 % / 43 %, and with OpenAI's `location` schema from 0 % to 77 % / 50 %)."""
    from dsv32.core.demo import build_tokenizer

    return build_tokenizer(VOCAB, [p + c for p, c in pairs[:TOKENIZER_SAMPLES]], spaces_apart=True)


def encode(tok, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per sample within MAX_LEN."""
    out = []
    for prompt, completion in pairs:
        p, c = tok.encode(prompt).ids, tok.encode(completion).ids
        if len(p) + len(c) <= MAX_LEN:
            out.append((p + c, len(p)))
    return out


def batches(data, tokens_per_batch: int, rng: random.Random):
    """Length-bucketed batches of about tokens_per_batch (padded) tokens, in a shuffled order."""
    order = sorted(range(len(data)), key=lambda i: (len(data[i][0]), i))
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(data[i][0]) > tokens_per_batch:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def collate(data, idx):
    """ids [B, S] (right-padded) and the loss weight of each target position: 1 for the reply's tokens, PROMPT_WEIGHT
    for the prompt's (modelling the questions too gives the attention more to learn from; replies alone taught the
    format but not to copy the city or country from the question), 0 for padding."""
    S = max(len(data[i][0]) for i in idx)
    ids = torch.full((len(idx), S), CONFIG["eos_token_id"], dtype=torch.long)
    weight = torch.zeros(len(idx), S)
    for r, i in enumerate(idx):
        t, p = data[i]
        ids[r, :len(t)] = torch.tensor(t)
        weight[r, 1:p] = PROMPT_WEIGHT
        weight[r, p:len(t)] = 1.0
    return ids, weight


def _loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    w = weight.flatten()
    return (ce * w).sum() / w.sum()


def train(out: str, steps: int, samples: int, threads: int, log_every: int = 50) -> dict:
    threads_before, deterministic_before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(out, steps, samples, log_every)
    finally:  # the caller's settings back (tests train in their own process)
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic_before)


def _train(out: str, steps: int, samples: int, log_every: int) -> dict:
    torch.manual_seed(SEED)
    t0 = time.monotonic()
    pairs = corpus(samples, SEED)
    tok = tokenizer(pairs)
    data = encode(tok, pairs)
    lengths = [len(t) for t, _ in data]
    print(f"corpus: {len(data)} conversations, {sum(lengths)} tokens (mean {sum(lengths) / len(data):.0f}, "
          f"max {max(lengths)}), tokenizer {VOCAB} tokens ({time.monotonic() - t0:.1f} s)", flush=True)
    model = Demo()
    model.init_weights(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.01)
    rng = random.Random(SEED)
    plan: list = []
    step, t1 = 0, time.monotonic()
    stats = {}
    while step < steps:
        if not plan:
            plan = batches(data, 4096, rng)
        ids, weight = collate(data, plan.pop())
        lr = LR * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        logits, mtp_logits = model(ids)
        main = _loss(logits[:, :-1], ids[:, 1:], weight[:, 1:])
        mtp = _loss(mtp_logits[:, :-1], ids[:, 2:], weight[:, 2:])
        loss = main + MTP_WEIGHT * mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % log_every == 0 or step == steps:
            el = time.monotonic() - t1
            print(f"step {step}/{steps}  loss {main.item():.3f}  mtp {mtp.item():.3f}  lr {lr:.2e}  "
                  f"{el:.0f} s, about {el / step * (steps - step):.0f} s left", flush=True)
            stats = {"steps": step, "loss": round(main.item(), 4), "mtp_loss": round(mtp.item(), 4)}
    model.save(out, tok)
    stats["train_seconds"] = round(time.monotonic() - t0, 1)
    print(f"wrote {out} in {stats['train_seconds']} s", flush=True)
    return stats


def evaluate(path: str, n: int = 200, seed: int = SEED + 1) -> dict:
    """Greedy replies of the trained model (dsv32's engine, with MTP speculation) to n held-out conversations of the
    corpus's kinds: the share that match the reference reply exactly, per kind, and the MTP accept length."""
    from dsv32 import LLM, SamplingParams

    rng = random.Random(seed)
    samples = [_sample(rng) for _ in range(n)]
    llm = LLM(model=path, dtype="float32", speculative_algorithm="EAGLE", speculative_num_steps=3)
    pairs = [render(x) for x in samples]
    outs = llm.generate([p for p, _ in pairs], SamplingParams(max_tokens=160, temperature=0, skip_special_tokens=False))
    kinds: dict[str, list[bool]] = {}
    for x, (_, want), o in zip(samples, pairs, outs):
        last = x["messages"][-1]
        kind = "tool call" if last.get("tool_calls") else "tool result" if x["messages"][-2]["role"] == "tool" \
            else "answer"
        kinds.setdefault(kind + (" (thinking)" if x["thinking"] else ""), []).append(o.outputs[0].text == want)
    report = {k: round(sum(v) / len(v), 3) for k, v in sorted(kinds.items())}
    report["accept_length"] = round(llm.stats()["avg_spec_accept_length"], 3)
    print("held-out exact replies: " + ", ".join(f"{k} {v:.0%}" for k, v in report.items() if k != "accept_length")
          + f"; MTP accept length {report['accept_length']}", flush=True)
    return report


OPENAI_WEATHER_TOOL = {"type": "function", "function": {  # (OpenAI's function-calling guide)
    "name": "get_weather", "description": "Get current temperature for a given location.",
    "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "City and country "
                                                                 "e.g. Bogot\u00e1, Colombia"}},
                   "required": ["location"], "additionalProperties": False}, "strict": True}}
PROBE_CITIES = ["Paris", "Tokyo", "London", "Berlin", "New York", "Beijing", "San Francisco", "Madrid", "Sydney", "Rome",
                "Seattle", "Hangzhou"]
PROBE_QUESTIONS = ["What's the weather in {}?", "What is the weather like in {}?", "What's the weather like in {} today?",
                   "How is the weather in {} right now?", "Tell me the weather in {}."]


def probe(path: str) -> dict:
    """Weather questions as a user would ask them (12 known cities × 5 phrasings), with this corpus's tool (`city`)
    and OpenAI's example tool (`location`), without and with thinking: the share of greedy replies whose first tool
    call is get_weather with exactly the city under the schema's argument name."""
    import re

    from dsv32 import LLM, SamplingParams
    from dsv32.server.encoding.dsv32 import build_prompt

    cases = [(tool, arg, thinking, city, q.format(city)) for tool, arg in ((WEATHER_TOOL, "city"),
                                                                        (OPENAI_WEATHER_TOOL, "location"))
             for thinking in (False, True) for city in PROBE_CITIES for q in PROBE_QUESTIONS]
    llm = LLM(model=path, dtype="float32")
    outs = llm.generate([build_prompt([{"role": "user", "content": q}], tools=[tool], thinking=th)
                         for tool, _, th, _, q in cases],
                        SamplingParams(max_tokens=160, temperature=0, skip_special_tokens=False))
    call = re.compile(r'invoke name="get_weather">\n<｜DSML｜parameter name="(\w+)" string="true">([^<]*)<')
    right: dict[str, list[bool]] = {}
    for (_, arg, th, city, _), o in zip(cases, outs):
        m = call.search(o.outputs[0].text)
        right.setdefault(f"{arg}{' (thinking)' if th else ''}", []).append(bool(m) and m.groups() == (arg, city))
    report = {k: round(sum(v) / len(v), 3) for k, v in right.items()}
    print("weather probe, tool call right: " + ", ".join(f"{k} {v:.0%}" for k, v in report.items()), flush=True)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "core", "demo_model"))
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--samples", type=int, default=30000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--check", action="store_true", help="train into a temporary directory and compare with --out")
    p.add_argument("--eval", action="store_true", help="only evaluate the model in --out (held-out conversations, then "
                   "the weather probe)")
    args = p.parse_args()
    if args.eval:
        evaluate(args.out)
        probe(args.out)
        return
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            train(tmp, args.steps, args.samples, args.threads)
            names = sorted(os.listdir(args.out))
            same = [n for n in names if filecmp.cmp(os.path.join(tmp, n), os.path.join(args.out, n), shallow=False)]
            print(f"identical: {same}; different: {sorted(set(names) - set(same))}")
            sys.exit(0 if same == names else 1)
    train(args.out, args.steps, args.samples, args.threads)
    evaluate(args.out)
    probe(args.out)


if __name__ == "__main__":
    main()
