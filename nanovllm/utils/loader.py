"""Loads safetensors checkpoints (single file or sharded) into a model whose parameters carry
their own `weight_loader`. Only safetensors are read: no pickle, no remote code."""
import glob
import math
import os

import torch
from safetensors import SafetensorError, safe_open
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
    param.data.copy_(loaded)


def check_safetensors_files(path: str) -> list[str]:
    """The checkpoint's *.safetensors files, each header read and checked. Reading a header is cheap
    (no tensor data), and safetensors verifies that the file is as long as its header says, so a
    truncated or corrupt file is reported here, before any model is built."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    for file in files:
        try:
            with safe_open(file, "pt", device="cpu") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read safetensors file {file!r} (truncated or corrupt?): {e}") from e
    return files


def checkpoint_numel(path: str) -> int:
    """Elements in the checkpoint's tensors, read from the headers alone (no tensor data)."""
    total = 0
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(file, "pt", device="cpu") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def _checkpoint_tensors(path: str):
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    for file in files:
        try:
            with safe_open(file, "pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read safetensors file {file!r} (truncated or corrupt?): {e}") from e


def load_model(model: nn.Module, path: str) -> None:
    packed = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_names = set()
    for name, tensor in _checkpoint_tensors(path):
        shard_id = None
        for fragment, (fused, shard) in packed.items():
            if fragment in name:
                name, shard_id = name.replace(fragment, fused), shard
                break
        param = params.get(name)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {type(model).__name__}")
        try:
            getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard_id)
        except RuntimeError as e:  # a shape mismatch: the config does not describe these weights
            raise ValueError(f"checkpoint tensor {name!r} of shape {tuple(tensor.shape)} does not fit "
                             f"parameter of shape {tuple(param.shape)}: {e}") from e
        loaded_names.add(name)
    # Tied weights appear under two names; either one being loaded is enough.
    missing = {n for n, p in params.items() if n not in loaded_names
               and not any(p is params[m] for m in loaded_names)}
    if missing:
        raise ValueError(f"checkpoint at {path!r} lacks weights for {sorted(missing)[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
