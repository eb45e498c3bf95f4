"""aiter.utility.fp4_utils (fake): the e8m0 scale layout of aiter's MXFP4 kernels, and MXFP4 arithmetic."""

import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def e8m0_shuffle(scale):
    """Scales [m, n] (one per 32 elements of a row) in the order aiter's MXFP4 kernels read them: padded to m a multiple
    of 256 and n of 8, then within each 32 rows × 8 columns the two 16-row halves and the two 4-column quarters are
    interleaved innermost."""
    if scale is None or scale.dtype == torch.float32:
        return scale
    assert scale.ndim == 2
    m, n = scale.shape
    padded = torch.zeros((m + 255) // 256 * 256, (n + 7) // 8 * 8, dtype=scale.dtype)
    padded[:m, :n] = scale
    sm, sn = padded.shape
    return padded.view(sm // 32, 2, 16, sn // 8, 2, 4).permute(0, 3, 5, 2, 4, 1).contiguous().view(sm, sn)


def e8m0_unshuffle(shuffled):
    """The inverse of e8m0_shuffle on its padded shape (the fake kernels read scales through it)."""
    sm, sn = shuffled.shape
    return shuffled.view(sm // 32, sn // 8, 4, 16, 2, 2).permute(0, 5, 3, 1, 4, 2).contiguous().view(sm, sn)


def dequant_fp4(packed_u8, scale_u8):
    """fp32 [.., N, K] from packed e2m1 bytes [.., N, K/2] (low nibble = even element) and e8m0 scales [.., N, K/32]."""
    lut = torch.tensor(E2M1)
    p = packed_u8.long()
    vals = torch.stack([lut[p & 15], lut[p >> 4]], -1).flatten(-2)
    return vals * torch.exp2(scale_u8.float() - 127).repeat_interleave(32, -1)


def qdq_mxfp4(x):
    """x rounded through dynamic MXFP4 per 32 elements of a row (OCP: scale 2^(floor(log2 amax) − 2), e2m1 nearest,
    ties to the even code)."""
    T, K = x.shape
    g = x.float().view(T, K // 32, 32)
    amax = g.abs().amax(-1, keepdim=True)
    exp = torch.where(amax > 0, torch.frexp(amax.clamp(min=2.0 ** -126)).exponent.float() - 3, torch.zeros_like(amax))
    scale = torch.exp2(exp)
    mags = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    a = (g.abs() / scale).clamp(max=6.0)
    d = (a[..., None] - mags).abs()
    tie_odd = (d == d.amin(-1, keepdim=True)) & (torch.arange(8) % 2 == 1)  # on a tie the even code wins, as the
    nearest = mags[(d + tie_odd * 1e-6).argmin(-1)]  # hardware conversion rounds
    return (torch.sign(g) * nearest * scale).view(T, K)
