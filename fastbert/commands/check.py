"""`fastbert check`: every CUDA kernel against its pure-PyTorch twin on fresh random inputs."""
import importlib

HELP = "run every CUDA kernel against its PyTorch twin on fresh random inputs (needs a GPU)"

# op modules that expose selfcheck(device) -> list[CheckResult]
CHECKED_MODULES = ["gather", "layernorm", "cross_entropy", "attention", "bias_gelu", "bias_dropout_residual_layernorm",
                   "embeddings_layernorm_dropout"]


def add_arguments(parser):
    parser.add_argument("--device", default="cuda", help="CUDA device to check (default: cuda)")


def run(args):
    import torch

    from fastbert import _backend

    if not torch.cuda.is_available():
        print("fastbert check: no CUDA GPU is visible, so there is no kernel to run; "
              "every op uses its PyTorch twin here.")
        return 0
    if not _backend.cuda_ops():
        print("fastbert check: fastbert._C holds no CUDA kernels (built with FASTBERT_SKIP_CUDA=1, "
              "or without nvcc); rebuild with `pip install --no-build-isolation -e .`.")
        return 1
    why = _backend.device_problem(torch.device(args.device))
    if why is not None:  # running a kernel there would cost the process its CUDA context
        print(f"fastbert check: the CUDA kernels cannot run on {args.device}: {why}. Every op uses its "
              "PyTorch twin there.")
        return 0
    results = []
    for name in CHECKED_MODULES:
        module = importlib.import_module(f"fastbert.ops.{name}")
        if hasattr(module, "selfcheck"):
            results += module.selfcheck(torch.device(args.device))
    header = f"{'op':<14} {'dtype':<9} {'case':<44} {'kernel err':>11} {'twin err':>11}  result"
    print(header)
    print("-" * len(header))
    for r in results:
        verdict = "ok" if r.ok else ("FAIL (unwritten output)" if not r.written else "FAIL")
        print(f"{r.op:<14} {r.dtype:<9} {r.case:<44} {r.kernel_error:>11.3e} {r.twin_error:>11.3e}  {verdict}")
    failed = sum(not r.ok for r in results)
    print(f"\n{len(results) - failed} passed, {failed} failed "
          "(rule: kernel error <= 2 x twin error against an fp32 reference)")
    return 1 if failed else 0
