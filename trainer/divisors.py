"""The divisor pair LyCORIS factors a dimension by (LoKr's Kronecker factors, Diag-OFT's blocks). Torch-free, so
the config can check layouts before anything loads."""


def balanced_pair(dim: int, limit: int) -> tuple[int, int]:
    """The divisor pair (m <= n, m * n = dim) nearest sqrt(dim) whose smaller part is at most `limit`."""
    m = 1
    for d in range(2, dim + 1):
        if d > limit:
            break
        if dim % d:
            continue
        m = d
        if d >= dim // d:
            break
    return min(m, dim // m), max(m, dim // m)
