"""Adaptive average pooling that exports to ONNX with dynamic H and W.

`F.adaptive_avg_pool2d(x, k)` with k > 1 has no dynamic ONNX form. Bin i of k over a length n
spans [floor(i*n/k), ceil((i+1)*n/k)); with an integral image (a zero-padded double cumsum) each
bin's sum is four corner lookups, so the graph is CumSum + Gather + arithmetic, all shape-driven.
"""

from __future__ import annotations

import torch


def _bin_edges(n: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # n may be a SymInt while exporting: the edges then stay expressions of the input's shape.
    i = torch.arange(k, device=device)
    starts = torch.div(i * n, k, rounding_mode="floor")
    ends = torch.div((i + 1) * n + (k - 1), k, rounding_mode="floor")
    return starts, ends


def adaptive_avg_pool2d(x: torch.Tensor, k: int) -> torch.Tensor:
    """Equal to `F.adaptive_avg_pool2d(x, k)` for any H, W (also H or W below k)."""
    if k == 1:
        return x.mean(dim=(2, 3), keepdim=True)
    dtype = x.dtype
    # float32 accumulation: a float16 cumsum overflows and loses the small differences.
    s = x.float().cumsum(dim=2).cumsum(dim=3)
    s = torch.nn.functional.pad(s, (1, 0, 1, 0))
    h0, h1 = _bin_edges(x.shape[2], k, x.device)
    w0, w1 = _bin_edges(x.shape[3], k, x.device)
    rows_end, rows_start = s.index_select(2, h1), s.index_select(2, h0)
    total = (
        rows_end.index_select(3, w1)
        - rows_start.index_select(3, w1)
        - rows_end.index_select(3, w0)
        + rows_start.index_select(3, w0)
    )
    area = (h1 - h0).unsqueeze(1) * (w1 - w0).unsqueeze(0)
    return (total / area.to(total.dtype)).to(dtype)
