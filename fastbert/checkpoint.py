"""Model directories in transformers' format: config.json + model.safetensors (or pytorch_model.bin,
or a sharded safetensors index). Keys are transformers' own, so either library loads the other's."""
import json
import os
import warnings

import torch

from fastbert.config import BertConfig

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"


def save_model(model, directory):
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    config = BertConfig.from_dict(model.config.to_dict())
    config.extra["architectures"] = [type(model).__name__]
    config.extra.setdefault("dtype", str(model.dtype).replace("torch.", ""))
    config.save_pretrained(directory)
    tied = set(model._tied_weights_keys)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    tmp = os.path.join(directory, SAFE_WEIGHTS + ".tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates the file 0600; give it the mode open() would
    os.replace(tmp, os.path.join(directory, SAFE_WEIGHTS))


def _umask():
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _read_safetensors(path, map_location):
    from safetensors.torch import load_file
    try:
        return load_file(path, device=str(map_location))
    except Exception as e:  # SafetensorError on truncated/corrupt files
        raise OSError(f"{path} is not a readable safetensors file ({e}); the download or copy may be "
                      "truncated") from None


def read_state_dict(directory, map_location="cpu"):
    """The state dict stored in a model directory, with the file it came from."""
    if not os.path.isdir(directory):
        raise OSError(f"{directory} is not a directory; expected a model directory holding config.json "
                      f"and {SAFE_WEIGHTS} or {TORCH_WEIGHTS}")
    path = os.path.join(directory, SAFE_WEIGHTS)
    if os.path.exists(path):
        return _read_safetensors(path, map_location), path
    path = os.path.join(directory, SAFE_INDEX)
    if os.path.exists(path):
        try:
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a valid safetensors index ({e})") from None
        state = {}
        for shard in shards:
            state.update(_read_safetensors(os.path.join(directory, shard), map_location))
        return state, path
    path = os.path.join(directory, TORCH_WEIGHTS)
    if os.path.exists(path):
        try:
            return torch.load(path, map_location=map_location, weights_only=True), path
        except Exception as e:
            raise OSError(f"{path} could not be read as a PyTorch checkpoint ({type(e).__name__}: {e}); "
                          "the file may be truncated") from None
    raise OSError(f"no weights in {directory}: expected {SAFE_WEIGHTS}, {SAFE_INDEX} or {TORCH_WEIGHTS}")


def _rename(key):
    # TF-era checkpoints call LayerNorm's parameters gamma and beta
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


def adapt_keys(state, model):
    """Rename old keys and add or strip the 'bert.' prefix so a BertModel checkpoint loads into
    BertForPreTraining and the other way round (transformers' base_model_prefix)."""
    state = {_rename(k): v for k, v in state.items()}
    prefix = model.base_model_prefix + "."
    expected = set(model.state_dict())
    has_prefix = any(k.startswith(prefix) for k in state)
    wants_prefix = any(k.startswith(prefix) for k in expected)
    if has_prefix and not wants_prefix:  # BertForPreTraining checkpoint -> BertModel
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    elif wants_prefix and not has_prefix:  # BertModel checkpoint -> BertForPreTraining
        state = {(k if k.startswith("cls.") else prefix + k): v for k, v in state.items()}
    return state


def load_model(cls, path, *, config=None, map_location="cpu", output_loading_info=False, **config_overrides):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise OSError(f"{path} does not exist; expected a model directory holding config.json and weights")
    if config is None:
        config = BertConfig.from_pretrained(path)
    if config_overrides:
        config = BertConfig.from_dict({**config.to_dict(), **config_overrides})
    state, weights_file = read_state_dict(path, map_location)
    model = cls(config)
    state = adapt_keys(state, model)
    own = model.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{weights_file}: {k} has shape {tuple(v.shape)} but config.json implies "
                             f"{tuple(own[k].shape)}")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in model._tied_weights_keys and
               not k.endswith(("position_ids", "token_type_ids"))]
    unexpected = [k for k in result.unexpected_keys if not k.endswith(("position_ids", "token_type_ids"))]
    if missing:
        warnings.warn(f"{weights_file} lacks {len(missing)} weights of {cls.__name__}, newly initialized: "
                      f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}", stacklevel=3)
    if unexpected and not all(k.startswith("cls.") for k in unexpected):
        warnings.warn(f"{weights_file} holds {len(unexpected)} weights {cls.__name__} does not use: "
                      f"{', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}", stacklevel=3)
    model.tie_weights()
    model = model.to(map_location) if map_location not in (None, "cpu") else model
    if output_loading_info:  # as transformers: the keys left newly initialized and the ones not used
        return model, {"missing_keys": missing, "unexpected_keys": unexpected}
    return model
