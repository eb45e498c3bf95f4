"""aiter.ops.shuffle (fake)."""


def shuffle_weight(x, layout=(16, 16), use_int4=False):
    """The weight layout aiter's CK/asm MoE and GEMM kernels read: rows in tiles of layout[0], columns in tiles of
    2·layout[1], each tile's 16-byte column packets moved ahead of its rows. Marks the result `is_shuffled`."""
    assert not use_int4
    rows, cols = layout[0], 2 * layout[1]
    pack = 16 // x.element_size()
    n, k = x.shape[-2:]
    assert n % rows == 0 and k % cols == 0
    y = x.reshape(-1, n // rows, rows, k // cols, cols // pack, pack).permute(0, 1, 3, 4, 2, 5).contiguous()
    y = y.view(x.shape)
    y.is_shuffled = True
    return y


def unshuffle(y, layout=(16, 16)):
    """The inverse of shuffle_weight (the fake kernels read weights through it)."""
    rows, cols = layout[0], 2 * layout[1]
    pack = 16 // y.element_size()
    n, k = y.shape[-2:]
    return (y.reshape(-1, n // rows, k // cols, cols // pack, rows, pack).permute(0, 1, 4, 2, 3, 5)
            .reshape(y.shape))
