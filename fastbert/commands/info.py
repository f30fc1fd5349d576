"""`fastbert info`: what this installation is and which kernels it holds."""
HELP = "show fastbert, torch and CUDA versions, the GPU, and which CUDA kernels were compiled"


def add_arguments(parser):
    pass


def run(args):
    import platform

    import torch

    from fastbert import _backend, __version__
    from fastbert.ops import OP_NAMES

    rows = [("fastbert", __version__), ("python", platform.python_version()), ("torch", torch.__version__),
            ("torch CUDA", torch.version.cuda or "none (CPU build)")]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows.append(("GPU", f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB), "
                            f"{torch.cuda.device_count()} visible"))
    else:
        rows.append(("GPU", "none visible"))
    if _backend.extension_loaded():
        cuda_ops = _backend.cuda_ops()
        rows.append(("fastbert._C", "loaded"))
        rows.append(("CUDA kernels", ", ".join(cuda_ops) if cuda_ops else "none (built without CUDA)"))
        missing = [n for n in OP_NAMES if n not in cuda_ops]
        if cuda_ops and missing:
            rows.append(("no kernel for", ", ".join(missing)))
        if _backend.has_op("cuda_arch_list"):
            rows.append(("built for", torch.ops.fastbert.cuda_arch_list().replace(";", ", ") or "not recorded"))
        if cuda_ops and torch.cuda.is_available():
            why = _backend.device_problem(torch.device("cuda", torch.cuda.current_device()))
            rows.append(("kernels on this GPU", "yes" if why is None else f"no: {why}"))
    else:
        rows.append(("fastbert._C", f"not loaded ({_backend.extension_error()})"))
        rows.append(("CUDA kernels", "none: every op runs its PyTorch twin"))
    rows.append(("kernels enabled", "yes" if _backend.kernels_enabled() else "no (FASTBERT_KERNELS=0 or use_kernels(False))"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
