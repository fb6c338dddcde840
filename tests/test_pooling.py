import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from resfuse.models.pooling import adaptive_avg_pool2d


@given(
    h=st.integers(1, 70),
    w=st.integers(1, 70),
    k=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
@example(h=1, w=1, k=1, seed=0)  # the smallest input
@example(h=1, w=70, k=9, seed=1)  # wide, and fewer rows than bins
@example(h=70, w=3, k=9, seed=2)  # tall, and fewer columns than bins
@example(h=19, w=28, k=9, seed=3)  # 2k + 1 and 3k + 1: bins of unequal length that overlap
def test_equals_torch_adaptive_avg_pool(h: int, w: int, k: int, seed: int) -> None:
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(
        adaptive_avg_pool2d(x, k), F.adaptive_avg_pool2d(x, k), atol=2e-6, rtol=1e-5
    )


@pytest.mark.parametrize("k", [2, 3, 6])
def test_bins_follow_floor_ceil_edges(k: int) -> None:
    # A ramp makes each bin's mean identify its edges exactly: bin i of n spans
    # [floor(i*n/k), ceil((i+1)*n/k)).
    n = 11
    x = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 1, n, 5)
    pooled = adaptive_avg_pool2d(x, k)[0, 0, :, 0]
    for i in range(k):
        lo, hi = (i * n) // k, -(-(i + 1) * n // k)
        assert pooled[i].item() == pytest.approx((lo + hi - 1) / 2)


def test_half_precision_input_accumulates_in_float32() -> None:
    x = torch.full((1, 1, 300, 300), 200.0, dtype=torch.float16)  # its sums overflow float16
    out = adaptive_avg_pool2d(x, 4)
    assert out.dtype == torch.float16
    assert torch.all(out == 200.0)
