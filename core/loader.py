"""Checkpoint loader: sharded or single-file safetensors with official DeepSeek tensor names.

bf16/fp32 weights load as they are (cast to the model dtype); FP8 e4m3 weights come with
`<name>_scale_inv` [ceil(N/bn), ceil(K/bk)] and are handed to the backend's `prepare_linear` (the reference
dequantizes). Every tensor is checked against `weight_specs`: a missing, unexpected or mis-shaped tensor
is a `CheckpointError` naming it and both shapes. The MTP layer (index ≥ num_hidden_layers) is skipped
unless `include_mtp`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

import torch

from dsv32.core.config import ModelConfig
from dsv32.core.model import WeightSpec, weight_specs
from dsv32.core.ops import ExpertWeights, LinearWeight, Ops

log = logging.getLogger("dsv32.loader")

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the tensor."""


def checkpoint_files(model_dir: str) -> dict[str, str]:
    """tensor name → file path, from model.safetensors.index.json or by scanning *.safetensors."""
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: missing 'weight_map'")
        out = {}
        for name, fname in weight_map.items():
            path = os.path.join(model_dir, fname)
            if not os.path.isfile(path):
                raise CheckpointError(f"{index} maps tensor '{name}' to {fname}, which does not exist")
            out[name] = path
        return out
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}")
    out = {}
    for fname in files:
        path = os.path.join(model_dir, fname)
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                out[name] = path
    return out


class _Reader:
    """Opens each shard once, reads tensors by name, and reports progress for large checkpoints."""

    def __init__(self, files: dict[str, str], progress: bool):
        self.files = files
        self._handles = {}
        self.used: set[str] = set()
        self.total_bytes = sum(os.path.getsize(p) for p in set(files.values()))
        self.read_bytes = 0
        self.progress = progress and self.total_bytes > (1 << 30)
        self._last_report = 0.0
        self._start = time.monotonic()

    def has(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        t = self._handle(name).get_tensor(name)
        self.used.add(name)
        self.read_bytes += t.numel() * t.element_size()
        self._report()
        return t

    def _handle(self, name: str):
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def _report(self, final: bool = False) -> None:
        if not self.progress:
            return
        now = time.monotonic()
        if final or now - self._last_report > 2.0:
            self._last_report = now
            pct = 100.0 * self.read_bytes / max(self.total_bytes, 1)
            gb = self.read_bytes / 2**30
            rate = gb / max(now - self._start, 1e-6)
            print(f"\r[dsv32] loading weights {pct:5.1f}% ({gb:.1f} GiB, {rate:.2f} GiB/s)", end="",
                  file=sys.stderr, flush=True)
            if final:
                print(file=sys.stderr)


def load_weights(model_dir: str, cfg: ModelConfig, ops: Ops, dtype: torch.dtype, device,
                 include_mtp: bool = False, progress: bool = True) -> dict:
    """Returns name → tensor / LinearWeight / ExpertWeights for every spec, prepared by `ops`."""
    specs = weight_specs(cfg, include_mtp)
    reader = _Reader(checkpoint_files(model_dir), progress)
    device = torch.device(device)
    out: dict = {}
    for name, spec in specs.items():
        target = torch.float32 if spec.fp32 else dtype
        if spec.kind == "experts":
            out[name] = ops.prepare_experts(_read_experts(reader, name, spec, cfg, device), target)
            continue
        if not reader.has(name):
            if spec.optional:
                continue
            raise CheckpointError(f"missing tensor '{name}' (expected shape {list(spec.shape)})")
        if spec.kind == "duplicate":
            reader.used.add(name)
        elif spec.kind == "linear":
            out[name] = ops.prepare_linear(_read_linear(reader, name, spec.shape, cfg, device), target)
        else:
            out[name] = _read_plain(reader, name, spec.shape).to(device=device, dtype=target)
    if "lm_head.weight" not in out:  # tied embeddings
        out["lm_head.weight"] = ops.prepare_linear(LinearWeight(out["model.embed_tokens.weight"]), dtype)
    _check_unexpected(reader, cfg, include_mtp)
    reader._report(final=True)
    log.info("loaded %d tensors (%.2f GiB) from %s", len(reader.used), reader.read_bytes / 2**30, model_dir)
    return out


def _read_plain(reader: _Reader, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    got = reader.shape(name)
    if got != tuple(shape):
        raise CheckpointError(f"tensor '{name}' has shape {list(got)}, expected {list(shape)}")
    return reader.get(name)


def _read_linear(reader: _Reader, name: str, shape, cfg: ModelConfig, device) -> LinearWeight:
    weight = _read_plain(reader, name, shape)
    scale_name = name + "_scale_inv"
    if weight.dtype == torch.float8_e4m3fn:
        if not reader.has(scale_name):
            raise CheckpointError(f"FP8 tensor '{name}' has no '{scale_name}'")
        block = (cfg.quant.block_n, cfg.quant.block_k) if cfg.quant else (128, 128)
        n, k = shape
        expected = (-(-n // block[0]), -(-k // block[1]))
        scale = _read_plain(reader, scale_name, expected).float()
        return LinearWeight(weight.to(device), scale.to(device), block)
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise CheckpointError(f"tensor '{name}' has unsupported dtype {weight.dtype} (expected bf16/fp16/fp32 or fp8 e4m3)")
    if reader.has(scale_name):
        raise CheckpointError(f"tensor '{scale_name}' given for non-FP8 weight '{name}' ({weight.dtype})")
    return LinearWeight(weight.to(device))


def _stack(parts: list[LinearWeight]) -> LinearWeight:
    if any(p.is_fp8 != parts[0].is_fp8 for p in parts):
        raise CheckpointError("routed experts of one layer mix FP8 and non-FP8 weights")
    weight = torch.stack([p.weight for p in parts])
    scale = torch.stack([p.scale_inv for p in parts]) if parts[0].is_fp8 else None
    return LinearWeight(weight, scale, parts[0].block)


def _read_experts(reader: _Reader, name: str, spec: WeightSpec, cfg: ModelConfig, device) -> ExpertWeights:
    E, I, Hd = spec.shape
    proj = {"gate_proj": (I, Hd), "up_proj": (I, Hd), "down_proj": (Hd, I)}
    stacks = {}
    for pname, shape in proj.items():
        parts = []
        for j in range(E):
            tname = f"{name}.{j}.{pname}.weight"
            if not reader.has(tname):
                raise CheckpointError(f"missing tensor '{tname}' (expected shape {list(shape)})")
            parts.append(_read_linear(reader, tname, shape, cfg, device))
        stacks[pname] = _stack(parts)
    return ExpertWeights(stacks["gate_proj"], stacks["up_proj"], stacks["down_proj"])


def _check_unexpected(reader: _Reader, cfg: ModelConfig, include_mtp: bool) -> None:
    for name in sorted(reader.files):
        if name in reader.used:
            continue
        m = _LAYER_RE.match(name)
        if m and int(m.group(1)) >= cfg.num_hidden_layers:
            if not include_mtp and int(m.group(1)) < cfg.num_hidden_layers + max(cfg.num_nextn_predict_layers, 1):
                continue  # MTP layer, skipped unless asked for
        raise CheckpointError(f"unexpected tensor '{name}' (shape {list(reader.shape(name))}) not used by this config")


# ---- random weights (SGLang's --load-format dummy) ----------------------------------------------------------
# Linear layers kept in bf16 in the official FP8 checkpoint (everything else that is a linear layer is FP8-block).
_BF16_IN_FP8_CHECKPOINTS = ("lm_head.weight", "mlp.gate.weight", "indexer.weights_proj.weight")


def fp8_block_quantize(w: torch.Tensor, block: tuple[int, int] = (128, 128),
                       ue8m0: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek FP8-block format of w [.., N, K]: e4m3 weight and fp32 scale_inv per block (partial edge blocks;
    power-of-two scales when ue8m0, as V3.2's scale_fmt "ue8m0"), so that w ≈ weight · scale_inv."""
    bn, bk = block
    *lead, n, k = w.shape
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.zeros(*lead, nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[..., :n, :k] = w.float()
    blocks = padded.view(*lead, nb, bn, kb, bk)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-8) / 448.0
    if ue8m0:
        scale = torch.pow(2.0, torch.ceil(torch.log2(scale)))
    q = (blocks / scale[..., :, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(*lead, nb * bn, kb * bk)[..., :n, :k].contiguous(), scale


def dummy_weights(cfg: ModelConfig, ops: Ops, dtype: torch.dtype, device, seed: int = 0,
                  include_mtp: bool = False) -> dict:
    """Random weights for every spec, prepared by `ops` like load_weights' result: linear layers ~ N(0, 1/K) (so
    activations stay O(1)), FP8-block where the official checkpoint is FP8 when cfg.quant is set, norm weights in
    [0.5, 1.5), router bias and indexer k_norm bias small. Deterministic for a seed and device. For benchmarks and
    tests at full dimensions without a checkpoint."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    fp8 = cfg.quant is not None
    block = (cfg.quant.block_n, cfg.quant.block_k) if fp8 else (128, 128)

    def linear(shape, keep_bf16: bool) -> LinearWeight:
        w = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * shape[-1] ** -0.5
        if fp8 and not keep_bf16:
            return LinearWeight(*fp8_block_quantize(w, block), block)
        return LinearWeight(w.to(torch.bfloat16))

    def stacked(E, shape) -> LinearWeight:  # one expert at a time: bounds the fp32 temporaries
        parts = [linear(shape, False) for _ in range(E)]
        return _stack(parts)

    out: dict = {}
    for name, spec in weight_specs(cfg, include_mtp).items():
        target = torch.float32 if spec.fp32 else dtype
        if spec.kind == "experts":
            E, I, Hd = spec.shape
            raw = ExpertWeights(stacked(E, (I, Hd)), stacked(E, (I, Hd)), stacked(E, (Hd, I)))
            out[name] = ops.prepare_experts(raw, target)
        elif spec.kind == "linear":
            keep = spec.fp32 or name.endswith(_BF16_IN_FP8_CHECKPOINTS)
            out[name] = ops.prepare_linear(linear(spec.shape, keep), target)
        elif spec.kind == "tensor":
            if name.endswith("e_score_correction_bias") or name.endswith("k_norm.bias"):
                t = torch.randn(spec.shape, generator=g, device=device) * 0.1
            elif name.endswith("embed_tokens.weight"):
                t = torch.randn(spec.shape, generator=g, device=device)
            else:  # norm weights
                t = torch.rand(spec.shape, generator=g, device=device) + 0.5
            out[name] = t.to(target)
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = ops.prepare_linear(LinearWeight(out["model.embed_tokens.weight"]), dtype)
    return out
