"""The checkpoint adapter: reads a rank's part of a safetensors checkpoint (official DeepSeek names, sharded or
single-file) as the parallel plan says, and nothing else.

Each tensor is read with a safetensors slice of just this rank's rows / columns / experts, so a rank's host and
device memory for weights is its shard plus the replicated tensors (the bytes read are reported). FP8 e4m3 weights
come with `<name>_scale_inv` [ceil(N/bn), ceil(K/bk)]; the scale blocks covering the rank's part are sliced with it
(a part must start on a block boundary or lie inside one block), the pair is brought to the platform's fp8 format
(`to_platform_fp8`: kept, converted to e4m3fnuz, or dequantized where the device has no fp8) and goes to the
backend's `prepare_linear` (the reference dequantizes). Every tensor is checked against `weight_specs` (headers only for the
parts other ranks read): a missing, unexpected or mis-shaped tensor is a `CheckpointError` naming it and both shapes.
The MTP layer (index ≥ num_hidden_layers) is skipped unless `include_mtp`.

msModelSlim W8A8-dynamic checkpoints (Ascend's; `quant_model_description.json` names each tensor's type): a linear
typed W8A8_DYNAMIC is int8 [N, K] with `<name>_scale` [N, 1] (one scale per output channel) and a zero
`<name>_offset`; it becomes a LinearWeight with block (1, K) — W = int8 · scale, the same block-scale form as FP8, so
every backend can dequantize it and a backend with int8 kernels keeps it. FLOAT tensors are read as usual; any other
type (static W8A8, W4A8, ...) is refused naming the tensor.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import zlib

import torch

from dsv32.core.config import ModelConfig
from dsv32.core.fp4 import quantize_mxfp4, quantize_nvfp4
from dsv32.core.model.plan import ParallelPlan, Shard
from dsv32.core.model.specs import WeightSpec, weight_specs
from dsv32.core.ops import ExpertWeights, LinearWeight, Ops
from dsv32.core.parallel import RankLayout

log = logging.getLogger("dsv32.loader")

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_PROJS = ("gate_proj", "up_proj", "down_proj")


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


# ---- slices ---------------------------------------------------------------------------------------------------------
def _index(ndim: int, dim: int, start: int, end: int) -> tuple:
    idx = [slice(None)] * ndim
    idx[dim] = slice(start, end)
    return tuple(idx)


def _pad_to(t: torch.Tensor, dim: int, size: int, value: float = 0.0) -> torch.Tensor:
    """t with dimension `dim` padded to `size` (the padded last part of a vocabulary split)."""
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, torch.full(shape, value, dtype=t.dtype, device=t.device)], dim)


def scale_bounds(name: str, shard: Shard, n: int, block: int) -> tuple[int, int]:
    """The FP8 scale blocks [s0, s1) covering a shard of a weight dimension of n elements in `block`-wide blocks.
    The shard must start on a block boundary or lie inside one block, so its local block j is the scale's s0 + j."""
    start, end = shard.bounds(n)
    if start % block and start // block != (end - 1) // block:
        raise CheckpointError(
            f"tensor '{name}': this rank's part [{start}, {end}) of dimension {shard.dim} ({n} wide, split in "
            f"{shard.parts}) does not align with the FP8 scale blocks of {block}: choose a --tp / --ep that splits it "
            f"at multiples of {block}")
    return start // block, -(-end // block)


def slice_linear(name: str, w: LinearWeight, shard: Shard | None) -> LinearWeight:
    """This rank's part of an in-memory linear weight (with its FP8 scale blocks)."""
    if shard is None:
        return w
    if w.is_fp4:
        n, k = w.shape
        g = w.block[1]
        if shard.dim == 0:
            start, end = shard.bounds(n)
            rows = lambda t, v: _pad_to(t[start:end], 0, shard.size(n), v)  # noqa: E731
            gs = None if w.global_scale is None else rows(w.global_scale, 1.0)
            return LinearWeight(rows(w.weight, 0).contiguous(), rows(w.scale_inv, 0).contiguous(), w.block, w.fmt, gs,
                                w.input_scale, w.act)
        start, end = shard.bounds(k)
        if start % g or (end % g and end != k):
            raise CheckpointError(f"tensor '{name}': this rank's columns [{start}, {end}) do not start and end on the "
                                  f"{g}-element FP4 scale groups")
        return LinearWeight(w.weight[:, start // 2:end // 2].contiguous(), w.scale_inv[:, start // g:end // g].contiguous(),
                            w.block, w.fmt, w.global_scale, w.input_scale, w.act)
    n = w.weight.shape[shard.dim]
    start, end = shard.bounds(n)
    weight = _pad_to(w.weight[_index(2, shard.dim, start, end)], shard.dim, shard.size(n))
    if not w.is_fp8:
        return LinearWeight(weight.contiguous())
    s0, s1 = scale_bounds(name, shard, n, w.block[shard.dim])
    scale = _pad_to(w.scale_inv[_index(2, shard.dim, s0, s1)], shard.dim, -(-weight.shape[shard.dim] // w.block[shard.dim]),
                    1.0)
    return LinearWeight(weight.contiguous(), scale.contiguous(), w.block)


# ---- reading --------------------------------------------------------------------------------------------------------
class _Reader:
    """Opens each shard file once, reads tensors or parts of them by name, and reports progress on big checkpoints."""

    def __init__(self, files: dict[str, str], progress: bool, quant_types: dict[str, str] | None = None):
        self.files = files
        self.quant_types = quant_types or {}  # msModelSlim: tensor name → quantization type
        self.fp4_surprises: list[str] = []  # FP4 checkpoints: linears whose stored format contradicts the config
        self._handles = {}
        self.used: set[str] = set()
        self.total_bytes = sum(os.path.getsize(p) for p in set(files.values()))
        self.read_bytes = 0
        self.progress = progress and self.total_bytes > (1 << 30)
        self._last_report = 0.0
        self._start = time.monotonic()
        self.done_fraction = 0.0

    def has(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        """safetensors' dtype string from the header ('BF16', 'F8_E4M3', ...)."""
        return self._handle(name).get_slice(name).get_dtype()

    def get(self, name: str, dim: int | None = None, start: int = 0, end: int = 0) -> torch.Tensor:
        """The tensor, or its [start, end) part along `dim`."""
        handle = self._handle(name)
        if dim is None:
            t = handle.get_tensor(name)
        else:
            part = handle.get_slice(name)
            t = part[_index(len(part.get_shape()), dim, start, end)]
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
            gb = self.read_bytes / 2**30
            rate = gb / max(now - self._start, 1e-6)
            print(f"\r[dsv32] loading weights {100 * self.done_fraction:5.1f}% of tensors ({gb:.1f} GiB read, "
                  f"{rate:.2f} GiB/s)", end="", file=sys.stderr, flush=True)
            if final:
                print(file=sys.stderr)


def load_weights(model_dir: str, cfg: ModelConfig, ops: Ops, dtype: torch.dtype, device,
                 include_mtp: bool = False, progress: bool = True, plan: ParallelPlan | None = None,
                 report: dict | None = None) -> dict:
    """Returns name → tensor / LinearWeight / ExpertWeights of this rank's part (plan; default: everything) of every
    spec, prepared by `ops`. `report` (optional) receives read_bytes (what this rank read) and checkpoint_bytes."""
    plan = plan or ParallelPlan(cfg, RankLayout())
    specs = weight_specs(cfg, include_mtp)
    reader = _Reader(checkpoint_files(model_dir), progress, modelslim_types(model_dir) if cfg.modelslim else None)
    device = torch.device(device)
    fp8 = ops.platform().fp8_dtype
    out: dict = {}
    for k, (name, spec) in enumerate(specs.items()):
        reader.done_fraction = k / len(specs)
        target = torch.float32 if spec.fp32 else dtype
        if spec.kind == "experts":
            experts = _platform_experts(_read_experts(reader, name, spec, cfg, device, plan), fp8, target)
            out[name] = ops.prepare_experts(experts, target)
            continue
        if not reader.has(name):
            if spec.optional:
                continue
            raise CheckpointError(f"missing tensor '{name}' (expected shape {list(spec.shape)})")
        if spec.kind == "duplicate":
            reader.used.add(name)
        elif spec.kind == "linear":
            w = _read_linear(reader, name, spec.shape, cfg, device, plan.shard(name))
            out[name] = ops.prepare_linear(to_platform_fp8(w, fp8, target), target)
        else:
            out[name] = _read_plain(reader, name, spec.shape, plan.shard(name)).to(device=device, dtype=target)
    if "lm_head.weight" not in out:  # tied embeddings (split like the embedding)
        out["lm_head.weight"] = ops.prepare_linear(LinearWeight(out["model.embed_tokens.weight"]), dtype)
    if reader.fp4_surprises:
        log.warning("%d linear(s) are stored in another format than the quantization config's exclusion list says "
                    "(e.g. '%s'); each is loaded as stored", len(reader.fp4_surprises), reader.fp4_surprises[0])
    _check_unexpected(reader, cfg, include_mtp)
    reader.done_fraction = 1.0
    reader._report(final=True)
    log.info("loaded %d tensors from %s: read %.2f GiB of the checkpoint's %.2f GiB", len(reader.used), model_dir,
             reader.read_bytes / 2**30, reader.total_bytes / 2**30)
    if report is not None:
        report.update(read_bytes=reader.read_bytes, checkpoint_bytes=reader.total_bytes)
    return out


def modelslim_types(model_dir: str) -> dict[str, str]:
    """quant_model_description.json: tensor name → msModelSlim quantization type (W8A8_DYNAMIC, FLOAT, ...)."""
    from dsv32.core.config import MODELSLIM_DESCRIPTION

    path = os.path.join(model_dir, MODELSLIM_DESCRIPTION)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected an object mapping tensor names to quantization types")
    return {k: str(v) for k, v in raw.items() if k != "model_quant_type"}


def _check_shape(reader: _Reader, name: str, shape) -> None:
    got = reader.shape(name)
    if got != tuple(shape):
        raise CheckpointError(f"tensor '{name}' has shape {list(got)}, expected {list(shape)}")


def _read_plain(reader: _Reader, name: str, shape: tuple[int, ...], shard: Shard | None = None) -> torch.Tensor:
    _check_shape(reader, name, shape)
    if shard is None:
        return reader.get(name)
    n = shape[shard.dim]
    start, end = shard.bounds(n)
    return _pad_to(reader.get(name, shard.dim, start, end), shard.dim, shard.size(n))


def _read_int8_linear(reader: _Reader, name: str, shape, device, shard: Shard | None) -> LinearWeight:
    """A W8A8_DYNAMIC linear of an msModelSlim checkpoint: int8 weight, per-output-channel scale, zero offset."""
    if reader.dtype_name(name) != "I8":
        raise CheckpointError(f"tensor '{name}' is typed W8A8_DYNAMIC but holds {reader.dtype_name(name)}, not int8")
    scale_name, offset_name = name + "_scale", name + "_offset"
    if not reader.has(scale_name):
        raise CheckpointError(f"missing tensor '{scale_name}' (expected shape {[shape[0], 1]}) for int8 '{name}'")
    _check_shape(reader, scale_name, (shape[0], 1))
    weight = _read_plain(reader, name, shape, shard)
    rows = None if shard is None or shard.dim != 0 else shard
    scale = _read_plain(reader, scale_name, (shape[0], 1), rows).float()
    if reader.has(offset_name):
        _check_shape(reader, offset_name, (shape[0], 1))
        if torch.count_nonzero(_read_plain(reader, offset_name, (shape[0], 1), rows)):
            raise CheckpointError(f"tensor '{offset_name}' is not zero: asymmetric int8 weights are not supported")
    return LinearWeight(weight.to(device), scale.to(device), (1, shape[1]))


def _fp4_packed(reader: _Reader, name: str, cfg: ModelConfig) -> bool:
    """The stored tensor holds packed e2m1 pairs (unsigned or signed bytes) — in FP4 checkpoints only: elsewhere an I8
    weight is msModelSlim's int8."""
    return cfg.fp4 is not None and reader.dtype_name(name) in ("U8", "I8")


def _read_linear(reader: _Reader, name: str, shape, cfg: ModelConfig, device, shard: Shard | None = None) -> LinearWeight:
    if cfg.fp4 is not None:
        module = name.removesuffix(".weight")
        fp4 = _fp4_packed(reader, name, cfg)
        if fp4 != cfg.fp4.quantized(module):
            reader.fp4_surprises.append(module)
        if fp4:
            return _read_fp4_linear(reader, name, shape, cfg, device, shard)
    _check_shape(reader, name, shape)
    kind = reader.quant_types.get(name, "FLOAT")
    if kind == "W8A8_DYNAMIC":
        return _read_int8_linear(reader, name, shape, device, shard)
    if kind != "FLOAT":
        raise CheckpointError(f"tensor '{name}' is {kind} in quant_model_description.json: only W8A8_DYNAMIC and "
                              "FLOAT msModelSlim tensors are supported")
    scale_name = name + "_scale_inv"
    if reader.has(scale_name) and reader.dtype_name(name) == "F8_E4M3":
        block = (cfg.quant.block_n, cfg.quant.block_k) if cfg.quant else (128, 128)
        expected = tuple(-(-n // b) for n, b in zip(shape, block))
        _check_shape(reader, scale_name, expected)
        weight = _read_plain(reader, name, shape, shard)
        if shard is None:
            scale = reader.get(scale_name)
        else:
            s0, s1 = scale_bounds(name, shard, shape[shard.dim], block[shard.dim])
            scale = reader.get(scale_name, shard.dim, s0, s1)
            scale = _pad_to(scale, shard.dim, -(-weight.shape[shard.dim] // block[shard.dim]), 1.0)
        return LinearWeight(weight.to(device), scale.float().to(device), block)
    weight = _read_plain(reader, name, shape, shard)
    if weight.dtype == torch.float8_e4m3fn:
        raise CheckpointError(f"FP8 tensor '{name}' has no '{scale_name}'")
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise CheckpointError(f"tensor '{name}' has unsupported dtype {weight.dtype} (expected bf16/fp16/fp32 or fp8 e4m3)")
    if reader.has(scale_name):
        raise CheckpointError(f"tensor '{scale_name}' given for non-FP8 weight '{name}' ({weight.dtype})")
    return LinearWeight(weight.to(device))


def _read_fp4_linear(reader: _Reader, name: str, shape, cfg: ModelConfig, device, shard: Shard | None) -> LinearWeight:
    """An NVFP4 / MXFP4 linear (core/fp4.py): `weight` uint8 [N, K/2], `weight_scale` [N, K/group] (e4m3 / e8m0),
    NVFP4's `weight_scale_2` (global; one value, or one per row) and optional `input_scale`. This rank's rows, or its
    columns (a part of K that starts and ends on scale groups)."""
    q = cfg.fp4
    n, k = shape
    g = q.group_size
    module = name.removesuffix(".weight")
    if k % g:
        raise CheckpointError(f"tensor '{name}': FP4 needs the input width ({k}) to be a multiple of the {g}-element "
                              "scale group")
    _check_shape(reader, name, (n, k // 2))
    scale_name = module + ".weight_scale"
    if not reader.has(scale_name):
        raise CheckpointError(f"missing tensor '{scale_name}' (expected shape {[n, k // g]}) for FP4 '{name}'")
    _check_shape(reader, scale_name, (n, k // g))
    want = {"nvfp4": ("F8_E4M3",), "mxfp4": ("U8", "F8_E8M0")}[q.fmt]
    if reader.dtype_name(scale_name) not in want:
        raise CheckpointError(f"tensor '{scale_name}' holds {reader.dtype_name(scale_name)}; {q.fmt} group scales are "
                              f"{' or '.join(want)}")
    rows = cols = None
    if shard is not None and shard.dim == 0:
        rows = shard
    elif shard is not None:
        start, end = shard.bounds(k)
        if start % g or (end % g and end != k):
            raise CheckpointError(f"tensor '{name}': this rank's columns [{start}, {end}) do not start and end on the "
                                  f"{g}-element FP4 scale groups: choose a --tp / --ep that splits {k} at multiples "
                                  f"of {g}")
        cols = (start, end)

    def part(t_name: str, per: int) -> torch.Tensor:
        if cols is not None:
            return reader.get(t_name, 1, cols[0] // per, cols[1] // per)
        return _read_plain(reader, t_name, reader.shape(t_name), rows)

    weight, scale = part(name, 2).view(torch.uint8), part(scale_name, g)
    if q.fmt == "mxfp4":
        scale = scale.view(torch.uint8)  # (torch's float8_e8m0fnu has the same bits)
    if q.fmt == "mxfp4" and bool((scale == 255).any()):
        raise CheckpointError(f"tensor '{scale_name}': e8m0 scale 255 (NaN in the OCP format)")
    if q.fmt == "nvfp4" and not bool(torch.isfinite(scale.float()).all() and (scale.float() >= 0).all()):
        raise CheckpointError(f"tensor '{scale_name}': NaN, infinite or negative e4m3 group scales")
    global_scale = input_scale = None
    if q.fmt == "nvfp4":
        g2_name = module + ".weight_scale_2"
        if not reader.has(g2_name):
            raise CheckpointError(f"missing tensor '{g2_name}' (the NVFP4 global scale) for '{name}'")
        g2 = reader.get(g2_name).float().flatten()
        if g2.numel() not in (1, n) or not bool(torch.isfinite(g2).all() and (g2 > 0).all()):
            raise CheckpointError(f"tensor '{g2_name}': expected one positive finite value (or one per output row, "
                                  f"{n}), got shape {list(reader.shape(g2_name))}")
        g2 = g2.expand(n).contiguous()
        global_scale = g2 if rows is None else _pad_to(g2[slice(*rows.bounds(n))], 0, rows.size(n), 1.0)
        if reader.has(module + ".input_scale"):
            input_scale = reader.get(module + ".input_scale").float().flatten()[:1]
    return LinearWeight(weight.to(device).contiguous(), scale.to(device).contiguous(), (1, g), q.fmt,
                        None if global_scale is None else global_scale.to(device),
                        None if input_scale is None else input_scale.to(device), q.act)


_FNUZ_NAN = 0x80  # −0 in e4m3fn, NaN in e4m3fnuz


def to_platform_fp8(w: LinearWeight, fp8_dtype: torch.dtype | None, dtype: torch.dtype) -> LinearWeight:
    """A checkpoint weight in the platform's fp8 format (Platform.fp8_dtype). FP8-block weights come as OCP e4m3fn:
    - e4m3fn: unchanged;
    - e4m3fnuz (exponent bias 8: the same bits are worth half): bits kept, −0 (0x80, NaN in fnuz) → 0, scale_inv ×2,
      so weight · scale_inv is exactly the checkpoint's value;
    - None (no fp8): dequantized to dtype (the model's), in slices of the leading dim to bound the fp32 temporary.
    Other weights (bf16, int8) are returned unchanged."""
    if not w.is_fp8 or w.weight.dtype == fp8_dtype or w.weight.dtype == torch.int8:
        return w
    if w.weight.dtype != torch.float8_e4m3fn:
        raise CheckpointError(f"FP8 weights must be float8_e4m3fn (the checkpoint format), got {w.weight.dtype}")
    if fp8_dtype == torch.float8_e4m3fnuz:
        bits = w.weight.view(torch.uint8)
        if bits.device.type != "meta":
            bits = torch.where(bits == _FNUZ_NAN, torch.zeros_like(bits), bits)
        return LinearWeight(bits.view(torch.float8_e4m3fnuz), w.scale_inv * 2, w.block)
    if fp8_dtype is not None:
        raise CheckpointError(f"no conversion of FP8 checkpoint weights to {fp8_dtype}")
    bn, bk = w.block
    weight = w.weight if w.weight.dim() == 3 else w.weight[None]
    scale = w.scale_inv if w.scale_inv.dim() == 3 else w.scale_inv[None]
    n, k = weight.shape[-2:]
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    for e in range(weight.shape[0]):
        s = scale[e].float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        out[e] = (weight[e].float() * s).to(dtype)
    return LinearWeight(out if w.weight.dim() == 3 else out[0])


def _platform_experts(w: ExpertWeights, fp8_dtype, dtype) -> ExpertWeights:
    return ExpertWeights(*(to_platform_fp8(p, fp8_dtype, dtype) for p in (w.gate, w.up, w.down)))


def _stack(parts: list[LinearWeight]) -> LinearWeight:
    first = parts[0]
    if any(p.is_fp8 != first.is_fp8 or p.fmt != first.fmt or p.act != first.act for p in parts):
        raise CheckpointError("routed experts of one layer mix weight formats (FP8 / FP4 / unquantized)")

    def stacked(field: str):
        return None if getattr(first, field) is None else torch.stack([getattr(p, field) for p in parts])

    return LinearWeight(torch.stack([p.weight for p in parts]), stacked("scale_inv"), first.block, first.fmt,
                        stacked("global_scale"), stacked("input_scale"), first.act)


def _read_experts(reader: _Reader, name: str, spec: WeightSpec, cfg: ModelConfig, device,
                  plan: ParallelPlan) -> ExpertWeights:
    E, I, Hd = spec.shape
    first, count = plan.expert_range()
    proj = {"gate_proj": (I, Hd), "up_proj": (I, Hd), "down_proj": (Hd, I)}
    stacks = {}
    for pname, shape in proj.items():
        parts = []
        for j in range(E):
            tname = f"{name}.{j}.{pname}.weight"
            if not reader.has(tname):
                raise CheckpointError(f"missing tensor '{tname}' (expected shape {list(shape)})")
            if first <= j < first + count:
                parts.append(_read_linear(reader, tname, shape, cfg, device, plan.expert_shard(pname)))
            else:  # another rank's expert: checked, not read
                _check_shape(reader, tname, (shape[0], shape[1] // 2) if _fp4_packed(reader, tname, cfg) else shape)
                module = tname.removesuffix(".weight")
                reader.used.update((tname, tname + "_scale_inv", tname + "_scale", tname + "_offset",
                                    module + ".weight_scale", module + ".weight_scale_2", module + ".input_scale"))
        stacks[pname] = _stack(parts)
    return ExpertWeights(stacks["gate_proj"], stacks["up_proj"], stacks["down_proj"])


_KV_SCALES = (".k_scale", ".v_scale")  # calibrated FP8 KV-cache scales (ModelOpt / Quark): unused, dsv32's FP8 KV
# cache scales each token's entry itself


def _check_unexpected(reader: _Reader, cfg: ModelConfig, include_mtp: bool) -> None:
    skipped = [n for n in reader.files if n.endswith(_KV_SCALES) and n not in reader.used]
    if skipped:
        log.info("ignoring %d calibrated KV-cache scale tensors (e.g. '%s'): the FP8 KV cache scales per token",
                 len(skipped), skipped[0])
        reader.used.update(skipped)
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


def fp4_quantize(w: torch.Tensor, fmt: str, act: str = "") -> LinearWeight:
    """w [N, K] in the checkpoint layout of `fmt` (core/fp4.py), as the loader returns it."""
    if w.device.type == "meta":  # shapes only (ahead-of-time compilation)
        n, k = w.shape
        g = 16 if fmt == "nvfp4" else 32
        scale = torch.empty(n, k // g, dtype=torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8, device="meta")
        gs = torch.empty(n, device="meta") if fmt == "nvfp4" else None
        return LinearWeight(torch.empty(n, k // 2, dtype=torch.uint8, device="meta"), scale, (1, g), fmt, gs, act=act)
    if fmt == "nvfp4":
        q, scale, g2 = quantize_nvfp4(w)
        return LinearWeight(q, scale, (1, 16), "nvfp4", g2.float().expand(w.shape[0]).contiguous(), act=act)
    q, scale = quantize_mxfp4(w)
    return LinearWeight(q, scale, (1, 32), "mxfp4", act=act)


def dummy_weights(cfg: ModelConfig, ops: Ops, dtype: torch.dtype, device, seed: int = 0,
                  include_mtp: bool = False, plan: ParallelPlan | None = None) -> dict:
    """Random weights for every spec, prepared by `ops` like load_weights' result: linear layers ~ N(0, 1/K) (so
    activations stay O(1)), FP8-block where the official checkpoint is FP8 when cfg.quant is set, norm weights in
    [0.5, 1.5), router bias and indexer k_norm bias small. Each tensor (each routed expert) has its own seed, so a
    rank makes only its own experts and its part of every other tensor equals the same part of a single process's
    weights. FP4 configs (cfg.fp4): every linear the config does not exclude is NVFP4 / MXFP4. For benchmarks and tests at full dimensions without a checkpoint."""
    device = torch.device(device)
    plan = plan or ParallelPlan(cfg, RankLayout())
    fp8 = cfg.quant is not None
    block = (cfg.quant.block_n, cfg.quant.block_k) if fp8 else (128, 128)
    fp4 = cfg.fp4
    platform_fp8 = ops.platform().fp8_dtype

    def gen(name: str) -> torch.Generator | None:
        if device.type == "meta":  # shapes only (ahead-of-time compilation drives the kernels on meta tensors)
            return None
        return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))

    def linear(name: str, shape, keep_bf16: bool) -> LinearWeight:
        w = torch.randn(shape, generator=gen(name), device=device, dtype=torch.float32) * shape[-1] ** -0.5
        if fp4 is not None:
            if not fp4.quantized(name.removesuffix(".weight")) or shape[-1] % fp4.group_size:
                return LinearWeight(w.to(torch.bfloat16))
            return fp4_quantize(w, fp4.fmt, fp4.act)
        if fp8 and not keep_bf16:
            return LinearWeight(*fp8_block_quantize(w, block), block)
        return LinearWeight(w.to(torch.bfloat16))

    def prepared(w: LinearWeight, target: torch.dtype) -> LinearWeight:
        return ops.prepare_linear(to_platform_fp8(w, platform_fp8, target), target)

    out: dict = {}
    for name, spec in weight_specs(cfg, include_mtp).items():
        target = torch.float32 if spec.fp32 else dtype
        if spec.kind == "experts":
            E, I, Hd = spec.shape
            first, count = plan.expert_range()
            shapes = {"gate_proj": (I, Hd), "up_proj": (I, Hd), "down_proj": (Hd, I)}
            stacks = [_stack([slice_linear(f"{name}.{j}.{p}.weight", linear(f"{name}.{j}.{p}.weight", shape, False),
                                           plan.expert_shard(p)) for j in range(first, first + count)])
                      for p, shape in shapes.items()]
            out[name] = ops.prepare_experts(_platform_experts(ExpertWeights(*stacks), platform_fp8, target), target)
        elif spec.kind == "linear":
            keep = spec.fp32 or name.endswith(_BF16_IN_FP8_CHECKPOINTS)  # (FP4: the config's exclusion list decides)
            out[name] = prepared(slice_linear(name, linear(name, spec.shape, keep), plan.shard(name)), target)
        elif spec.kind == "tensor":
            g = gen(name)
            if name.endswith("e_score_correction_bias") or name.endswith("k_norm.bias"):
                t = torch.randn(spec.shape, generator=g, device=device) * 0.1
            elif name.endswith("embed_tokens.weight"):
                t = torch.randn(spec.shape, generator=g, device=device)
            else:  # norm weights
                t = torch.rand(spec.shape, generator=g, device=device) + 0.5
            shard = plan.shard(name)
            if shard is not None:
                start, end = shard.bounds(t.shape[shard.dim])
                t = _pad_to(t[_index(t.dim(), shard.dim, start, end)], shard.dim, shard.size(t.shape[shard.dim]))
            out[name] = t.to(target)
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = ops.prepare_linear(LinearWeight(out["model.embed_tokens.weight"]), dtype)
    return out
