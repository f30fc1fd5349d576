"""Runs every fastbert CUDA kernel once on small odd shapes (for compute-sanitizer memcheck/racecheck).

    compute-sanitizer --tool memcheck python scripts/sanitize_kernels.py
"""
import torch

import fastbert.ops as ops

dev = torch.device("cuda")
for dtype in (torch.float32, torch.bfloat16):
    # gather / scatter (vectorized and odd row sizes)
    for hidden in (96, 1001):
        x = torch.randn(33, hidden, device=dev, dtype=dtype, requires_grad=True)
        idx = torch.randperm(33, device=dev)[:7]
        ops.gather(x, idx).sum().backward()
    # layernorm: 16-byte path, scalar path, residual or not
    for hidden, residual in ((768, True), (1001, True), (384, False)):
        x = torch.randn(7, hidden, device=dev, dtype=dtype, requires_grad=True)
        r = torch.randn(7, hidden, device=dev, dtype=dtype, requires_grad=True) if residual else None
        w = torch.randn(hidden, device=dev, dtype=dtype, requires_grad=True)
        b = torch.randn(hidden, device=dev, dtype=dtype, requires_grad=True)
        ops.layer_norm(x, w, b, 1e-12, residual=r).float().square().sum().backward()
    # cross-entropy: unaligned rows, ignored rows, in place
    for vocab, inplace in ((30522, False), (1001, True), (2, False)):
        logits = torch.randn(7, vocab + 1, device=dev, dtype=dtype)[:, 1:]
        leaf = logits.detach().requires_grad_()
        labels = torch.randint(0, vocab, (7,), device=dev)
        labels[2] = -100
        ops.cross_entropy(leaf * 1 if inplace else leaf, labels, inplace_backward=inplace).backward()
# attention, where present
if hasattr(ops, "attention"):
    try:
        q, k, v = (torch.randn(2, 37, 4, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        mask = torch.ones(2, 37, device=dev, dtype=torch.long)
        mask[1, 20:] = 0
        ops.attention(q, k, v, mask, dropout_p=0.1, training=True).float().sum().backward()
    except TypeError as e:  # signature changed: say so, do not fail the others
        print(f"attention skipped: {e}")
torch.cuda.synchronize()
print("all kernels ran")
