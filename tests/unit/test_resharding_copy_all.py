"""`copy_all`, the resharding copies' fused path, against the plain loop it replaces on a GPU.

Random rectangles of several tensors: contiguous row blocks, strided column blocks, a cast (fp32
sources into bf16) and empty ones, all in one call, as `pack`, `unpack` and `copy_local` make them.
"""

import pytest
import torch

from tidal.resharding.messages import copy_all
from tidal.resharding.transports.cuda_ipc import copy_bytes


def _pairs(device: str, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    srcs, dsts = [], []
    for i in range(40):
        rows, cols = (int(x) for x in torch.randint(1, 65, (2,), generator=gen))
        src = torch.randn(rows, cols, generator=gen).to(
            device, torch.float32 if i % 7 == 0 else torch.bfloat16
        )
        dst = torch.full((rows + 3, cols + 2), float("nan"), dtype=torch.bfloat16, device=device)
        if i % 3 == 0:  # a strided column block of the target
            srcs.append(src[:, : cols // 2])
            dsts.append(dst[:rows, 1 : 1 + cols // 2])
        else:  # a contiguous row block
            srcs.append(src)
            dsts.append(dst[1 : 1 + rows].view(-1)[: rows * cols].view(rows, cols))
    return dsts, srcs


def _check(device: str) -> None:
    dsts, srcs = _pairs(device, seed=0)
    ref_dsts = [d.clone() for d in dsts]  # clones of views: the loop writes into its own copies
    for d, s in zip(ref_dsts, srcs, strict=True):
        d.copy_(s)
    copy_all(dsts, srcs, fused=True)
    for got, want in zip(dsts, ref_dsts, strict=True):
        assert torch.equal(got.cpu(), want.cpu())


def test_fused_copy_matches_the_loop_on_cpu():
    _check("cpu")


def test_copy_bytes_picks_a_width_every_buffer_allows():
    base = torch.arange(256, dtype=torch.uint8)
    srcs = [base[1:9], base[16:48], base[3:3]]  # an odd address, an aligned run, an empty buffer
    dsts = [
        torch.zeros(8, dtype=torch.uint8),
        torch.zeros(32, dtype=torch.uint8),
        torch.zeros(0, dtype=torch.uint8),
    ]
    copy_bytes(dsts, srcs)
    assert [d.tolist() for d in dsts] == [s.tolist() for s in srcs]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_copy_matches_the_loop_on_gpu():
    _check("cuda")
    for seed in range(3):  # uint8 buffers at assorted offsets: every width of copy_bytes
        gen = torch.Generator().manual_seed(seed)
        src = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=gen).cuda()
        cuts = sorted(int(x) for x in torch.randint(0, 1 << 16, (20,), generator=gen))
        srcs = [src[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        dsts = [torch.zeros_like(s) for s in srcs]
        copy_bytes(dsts, srcs)
        assert all(torch.equal(d, s) for d, s in zip(dsts, srcs, strict=True))
