"""aiter.fused_moe (fake): the 2-stage fused MoE as aiter's torch references (torch_moe_stage1/2) describe it."""

from typing import Optional

import torch

from aiter import ActivationType, QuantType
from aiter.ops.shuffle import unshuffle


def _deq_blocks(w, scale):
    E, N, K = w.shape
    s = scale.float().view(E, -(-N // 128), -(-K // 128))
    return w.float() * s.repeat_interleave(128, 1)[:, :N].repeat_interleave(128, 2)[:, :, :K]


def _quant_1x128(x, fp8):
    """Dynamic per-token per-128 activation quantization (aiter's per_1x128), then back to fp32."""
    T, K = x.shape
    b = x.float().view(T, K // 128, 128)
    scale = b.abs().amax(-1, keepdim=True).clamp(min=1e-10) / torch.finfo(fp8).max
    return ((b / scale).to(fp8).float() * scale).view(T, K)


def fused_moe(hidden_states, w1, w2, topk_weight, topk_ids, expert_mask: Optional[torch.Tensor] = None,
              activation=ActivationType.Silu, quant_type=QuantType.No, doweight_stage1=False,
              w1_scale: Optional[torch.Tensor] = None, w2_scale: Optional[torch.Tensor] = None,
              a1_scale: Optional[torch.Tensor] = None, a2_scale: Optional[torch.Tensor] = None, block_size_M=None,
              num_local_tokens: Optional[torch.Tensor] = None, moe_sorting_dispatch_policy=0, dtype=None,
              hidden_pad=0, intermediate_pad=0, bias1=None, bias2=None):
    """y [T, model_dim] = Σ_i topk_weight[t, i] · w2_e · act(w1_e · x)[gate] · (w1_e · x)[up], e = topk_ids[t, i]
    (global ids; with expert_mask [E_global] the local expert is cumsum(mask)[e] − 1 and masked-out ids add
    nothing). w1 [E, 2I, K] (gate rows first), w2 [E, K, I], both shuffled by shuffle_weight. per_128x128: fp8
    weights with scales [E, ⌈N/128⌉, ⌈K/128⌉], activations quantized per token per 128 (x, then the intermediate).
    per_1x32: packed e2m1 weights [E, N, K/2] with e8m0 scales [E, N, K/32] shuffled by fp4_utils.e8m0_shuffle over E·N
    rows, activations quantized to MXFP4 per 32 (x, then the intermediate)."""
    assert getattr(w1, "is_shuffled", False) and getattr(w2, "is_shuffled", False), "weights must be shuffled"
    assert activation == ActivationType.Silu and not doweight_stage1
    assert topk_weight.dtype == torch.float32 and topk_ids.dtype == torch.int32
    T, K = hidden_states.shape
    if quant_type == QuantType.per_1x32:  # W4A4 MXFP4 (gfx950): e2m1 weights, shuffled e8m0 scales, MXFP4 activations
        from aiter.utility.fp4_utils import dequant_fp4, e8m0_unshuffle, qdq_mxfp4

        assert w1.element_size() == 1 and w1_scale is not None and w2_scale is not None
        g1, g2 = unshuffle(w1.view(torch.uint8)), unshuffle(w2.view(torch.uint8))

        def scales(s, w):
            E, N = w.shape[:2]
            return e8m0_unshuffle(s.view(torch.uint8).reshape(E * N, -1)).view(E, N, -1)

        W1, W2 = dequant_fp4(g1, scales(w1_scale, w1)), dequant_fp4(g2, scales(w2_scale, w2))
        act = qdq_mxfp4
    elif quant_type in (QuantType.per_128x128, QuantType.per_1x128):
        g1, g2 = unshuffle(w1).view(w1.shape), unshuffle(w2).view(w2.shape)
        fp8 = w1.dtype
        assert fp8 in (torch.float8_e4m3fn, torch.float8_e4m3fnuz) and w1_scale is not None and w2_scale is not None
        W1, W2 = _deq_blocks(g1, w1_scale), _deq_blocks(g2, w2_scale)
        act = (lambda a: _quant_1x128(a, fp8))
    else:
        assert quant_type == QuantType.No and w1.dtype == hidden_states.dtype
        g1, g2 = unshuffle(w1).view(w1.shape), unshuffle(w2).view(w2.shape)
        W1, W2, act = g1.float(), g2.float(), (lambda a: a.float())
    local = None
    if expert_mask is not None:
        local = torch.cumsum(expert_mask.long(), 0) - 1
    I = W1.shape[1] // 2  # noqa: E741
    x = act(hidden_states)
    out = torch.zeros(T, K, dtype=torch.float32)
    for t in range(T):
        for i in range(topk_ids.shape[1]):
            e = int(topk_ids[t, i])
            if expert_mask is not None:
                if not bool(expert_mask[e]):
                    continue
                e = int(local[e])
            h = W1[e] @ x[t]
            h = (torch.nn.functional.silu(h[:I]) * h[I:]).to(hidden_states.dtype)
            out[t] += topk_weight[t, i] * (W2[e] @ act(h[None])[0])
    return out.to(hidden_states.dtype)
