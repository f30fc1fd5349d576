"""Checks at the public boundary. Bad input must never reach a kernel: an out-of-range index on
a GPU is a device assert that kills the whole process. Each check raises an exception whose
message says what was wrong and what was expected."""
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)


def tensor(name, value, *, ndim=None, dtypes=None, device=None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must be {ndim}-d, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but expected {device}")
    return value


def integer(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer ids, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (torch.long), got {str(value.dtype).replace('torch.', '')}")
    return value


def in_range(name, value, low, high, *, allowed=()):
    """Every element of `value` in [low, high) or one of `allowed`. One host sync, on any device."""
    if value.numel() == 0:
        return value
    ok = (value >= low) & (value < high)
    for a in allowed:
        ok |= value == a
    if not bool(ok.all()):
        bad = value[~ok].flatten()[0].item()
        extra = "".join(f" or {a}" for a in allowed)
        raise IndexError(f"{name} holds {bad}, outside the valid range [{low}, {high}){extra}")
    return value


def unique(name, value):
    if value.numel() > 1 and torch.unique(value).numel() != value.numel():
        raise ValueError(f"{name} must hold unique indices (each row once), but some repeat")
    return value
