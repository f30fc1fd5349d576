"""gather/scatter (the masked-token gather of the MLM head) and unpad/pad."""
import pytest
import torch
from torch.library import opcheck

import fastbert
from fastbert import _backend
from fastbert.ops import gather, pad_input, scatter, unpad_input
from fastbert.ops.gather import selfcheck

needs_ext = pytest.mark.skipif(not _backend.has_op("gather_rows"),
                               reason="fastbert._C is not built, so torch.ops.fastbert.* does not exist")


@pytest.mark.parametrize("rows, hidden, picked", [(1, 96, 1), (7, 384, 3), (1000, 768, 150), (33, 1000, 17)])
def test_gather_and_grad(seed, rows, hidden, picked):
    x = torch.randn(rows, hidden + 3)[:, 1:hidden + 1].requires_grad_()  # non-contiguous rows
    index = torch.randperm(rows)[:picked]
    out = gather(x, index)
    torch.testing.assert_close(out, x.detach()[index], rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = torch.zeros(rows, hidden).index_copy_(0, index, grad)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def test_scatter_and_pad_round_trip(seed):
    lengths = [5, 1, 0, 9]
    hidden = torch.randn(4, 9, 12)
    mask = torch.zeros(4, 9, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    packed, indices, cu, max_len = unpad_input(hidden, mask)
    assert packed.shape == (sum(lengths), 12)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 5, 6, 6, 15] and max_len == 9
    torch.testing.assert_close(packed, hidden[mask.bool()], rtol=0, atol=0)
    back = pad_input(packed, indices, 4, 9)
    torch.testing.assert_close(back, hidden * mask[..., None], rtol=0, atol=0)
    # 4-d (heads) too
    packed4, *_ = unpad_input(hidden.view(4, 9, 3, 4), mask)
    assert packed4.shape == (15, 3, 4)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cpu(seed, dtype):
    x = torch.randn(11, 24, dtype=dtype, requires_grad=True)
    index = torch.randperm(11)[:5]
    opcheck(torch.ops.fastbert.gather_rows.default, (x, index))
    opcheck(torch.ops.fastbert.scatter_rows.default, (torch.randn(5, 24, dtype=dtype, requires_grad=True), index, 11))


@pytest.mark.parametrize("bad, exc, match", [
    (lambda x, i: gather(x, torch.tensor([0, 11])), IndexError, r"index holds 11, outside the valid range \[0, 11\)"),
    (lambda x, i: gather(x, torch.tensor([-1])), IndexError, "index holds -1"),
    (lambda x, i: gather(x, i.float()), TypeError, "integer"),
    (lambda x, i: gather(x, i[None]), ValueError, "1-d"),
    (lambda x, i: gather(x[0], i), ValueError, "2-d"),
    (lambda x, i: gather(x.requires_grad_(), torch.tensor([1, 1])), ValueError, "unique"),
    (lambda x, i: scatter(x[:2], i, 11), ValueError, "src has 2 rows"),
    (lambda x, i: scatter(x[:3], i, 2), IndexError, "outside the valid range"),
])
def test_bad_input(bad, exc, match):
    x, index = torch.randn(11, 4), torch.tensor([3, 0, 7])
    with pytest.raises(exc, match=match):
        bad(x, index)


@pytest.mark.gpu
def test_gpu_tolerance_rule_and_poison():
    results = selfcheck(torch.device("cuda"))
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_opcheck_and_compile(seed, dtype):
    x = torch.randn(301, 768, device="cuda", dtype=dtype, requires_grad=True)
    index = torch.randperm(301, device="cuda")[:45]
    assert _backend.use_kernel("gather_rows", x, index)
    opcheck(torch.ops.fastbert.gather_rows.default, (x, index))
    opcheck(torch.ops.fastbert.scatter_rows.default, (torch.randn(45, 768, device="cuda", dtype=dtype), index, 301))
    compiled = torch.compile(lambda t, i: torch.ops.fastbert.gather_rows(t, i) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x, index), x[index] * 2)


@pytest.mark.gpu
def test_gpu_bad_index_never_reaches_kernel():
    x = torch.randn(10, 64, device="cuda")
    with pytest.raises(IndexError):
        gather(x, torch.tensor([10], device="cuda"))
    torch.cuda.synchronize()  # the process is still healthy: no device assert happened


def test_empty_batches_pack_and_pad():
    hidden = torch.randn(2, 3, 4)
    mask = torch.zeros(2, 3, dtype=torch.long)
    packed, indices, cu, max_len = unpad_input(hidden, mask)
    assert packed.shape == (0, 4) and cu.tolist() == [0, 0, 0] and max_len == 0
    torch.testing.assert_close(pad_input(packed, indices, 2, 3), torch.zeros(2, 3, 4))
