"""Line tables shared by tests/test_lines.py (the kernel) and tests/test_lines_layout.py (its planning): random
structures, the shapes they are tried at, and the keep mask of a Lines by its definition."""
import torch

from attnpatch.plan import Lines


def keep_of(lines: Lines, Sq: int, Skv: int, off: int) -> torch.Tensor:
    """(B, H, Sq, Skv) keep of a Lines by its definition, index by index (no strided views)."""
    B, H = lines.cols.shape[:2]
    p = torch.arange(off, off + Sq)[:, None]  # (Sq, 1) positions
    j = torch.arange(Skv)[None, :]
    keep = torch.zeros(B, H, Sq, Skv, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            cols = lines.cols[b, h][lines.cols[b, h] >= 0]
            diags = lines.diags[b, h][lines.diags[b, h] >= 0]
            keep[b, h] = torch.isin(j, cols).expand(Sq, Skv) | torch.isin(p - j, diags)
    return keep & (j <= p)


def random_lines(g, B, H, Skv, nc, nd, near=None) -> Lines:
    """Random columns and offsets, with padding (-1) and repeats; ``near``: offsets drawn from two bands
    (0 .. near and far ones) so the kernel sees several key ranges per block."""
    cols = torch.randint(-1, Skv, (B, H, nc), generator=g)
    if near is None:
        diags = torch.randint(-1, Skv, (B, H, nd), generator=g)
    else:
        diags = torch.cat([torch.randint(0, near, (B, H, nd - nd // 2), generator=g),
                           torch.randint(Skv // 2, Skv, (B, H, nd // 2), generator=g)], -1)
    return Lines(cols, diags)


CASES = {  # B, Hq, Hkv, Sq, Skv, D, n_cols, n_diags, near, block
    "one-block": (1, 2, 2, 40, 40, 16, 3, 4, None, 64),
    "blocks": (1, 2, 2, 70, 70, 16, 5, 6, None, 16),
    "gqa-chunk": (2, 4, 2, 9, 49, 32, 5, 3, None, 4),
    "batch2-clusters-columns": (2, 3, 1, 90, 90, 16, 6, 8, 5, 16),
    "offset-clusters": (1, 4, 2, 33, 80, 16, 4, 6, 4, 8),
    "gqa-value-dim": (2, 6, 2, 17, 69, (32, 48), 2, 3, None, 8),  # v's head dim differs: no flash kernel
}
