"""Building the torch model a config names: its factory, then its checkpoint, in eval mode."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from miaotui.config import Config, folder_importable
from miaotui.errors import InputError, first_line


def factory_sources(factory: str) -> list[Path]:
    """The files that define what the factory builds, so that their content keys the export stage:
    a factory file itself, or a module; for a package's __init__ every file in its folder, since a
    package (like the built-in models) keeps its weights and vocabulary beside its code."""
    target, _, _ = factory.rpartition(":")
    if target.endswith(".py"):
        return [Path(target)]
    spec = importlib.util.find_spec(target) if _importable(target) else None
    if not spec or not spec.origin or not Path(spec.origin).is_file():
        return []
    origin = Path(spec.origin)
    if origin.name != "__init__.py":
        return [origin]
    return sorted(p for p in origin.parent.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def load_factory(factory: str, config_path: Path):
    target, _, function = factory.rpartition(":")
    where = f"{config_path}: model.factory"
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise InputError(f"{where}: file {path} does not exist")
        # A unique module name per file, so two configs' model.py files never shadow each other.
        name = "miaotui_user_model_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            del sys.modules[name]
            raise InputError(f"{where}: importing {path} failed: {type(error).__name__}: {error}") from error
    else:
        if not _importable(target):
            raise InputError(f"{where}: module {target!r} cannot be found")
        try:
            module = importlib.import_module(target)
        except Exception as error:
            raise InputError(f"{where}: importing {target} failed: {type(error).__name__}: {error}") from error
    fn = getattr(module, function, None)
    if not callable(fn):
        raise InputError(f"{where}: {target} has no function {function!r}")
    return fn


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Tensors from .safetensors, or from .pt/.pth with weights_only=True: never unpickle code."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:
            raise InputError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(f"{path}: not a weights-only torch checkpoint ({first_line(error)})") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: expected a state dict of tensors (or {{'state_dict': ...}})")
    return state


def apply_checkpoint(model, state: dict[str, Any], path: Path) -> None:
    """Load strictly, reporting the first mismatches in one line instead of torch's long message."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} is {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if wrong:
        problems.append(_few(wrong))
    if problems:
        raise InputError(f"{path}: checkpoint does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def _few(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def model_sources(config: Config) -> list[Path]:
    """The files whose content is the model (the export stage's key)."""
    if config.model.huggingface is not None:
        from miaotui.huggingface_folder import read_folder

        return read_folder(config.model.huggingface, f"{config.path}: model.huggingface").weight_files()
    return factory_sources(config.model.factory)


def load_model(config: Config):
    """The config's model in eval mode, with its checkpoint applied."""
    from torch import nn

    if config.model.huggingface is not None:
        from miaotui.models.huggingface import load_huggingface

        return load_huggingface(config.model.huggingface, f"{config.path}: model.huggingface")
    with folder_importable(config):
        return named_outputs(_load_factory_model(config, nn), config)


def named_outputs(model, config: Config):
    """`model`, or a wrapper returning only the outputs the config names: a dict's entries by key, a
    tuple's first ones by position (a model returning (logits, probs) exports its logits alone)."""
    import torch

    from miaotui.data.samples import sample_inputs, trace_sizes

    names = list(config.model.outputs)
    feed = {k: torch.from_numpy(v) for k, v in sample_inputs(config, trace_sizes(config)).items()}
    try:
        with torch.inference_mode():
            result = model(**feed)
    except Exception:
        return model  # the export reports the failure with its own context
    where = f"{config.path}: model.outputs"
    if isinstance(result, torch.Tensor):
        if len(names) > 1:
            raise InputError(f"{where}: the model returns 1 output(s), the config names {len(names)}")
        return model
    if isinstance(result, dict):
        if all(name in result for name in names):
            keys: list = names
        elif len(result) == len(names):
            return model  # unnamed: by position
        else:
            raise InputError(f"{where}: the model returns {', '.join(map(str, result))}; "
                             f"the config names {', '.join(names)}")
    elif isinstance(result, (tuple, list)):
        if len(result) < len(names):
            raise InputError(f"{where}: the model returns {len(result)} output(s), the config names {len(names)}")
        if len(result) == len(names):
            return model
        keys = list(range(len(names)))
    else:
        return model
    return _selecting(model, keys, list(config.inputs))


def _selecting(model, keys: list, input_names: list[str]):
    """A module whose forward takes the config's inputs by name (an explicit signature: torch.export
    binds dynamic shapes to it) and returns model(...)[key] for each key."""
    import inspect

    import torch

    class NamedOutputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, **inputs):
            result = self.model(**inputs)
            picked = tuple(result[key] for key in keys)
            return picked[0] if len(picked) == 1 else picked

    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in input_names]
    NamedOutputs.forward.__signature__ = inspect.Signature(parameters)
    return NamedOutputs().eval()


def _load_factory_model(config: Config, nn):
    build = load_factory(config.model.factory, config.path)
    try:
        model = build()
    except Exception as error:
        raise InputError(
            f"{config.path}: model.factory: {config.model.factory} raised {type(error).__name__}: {error}"
        ) from error
    if not isinstance(model, nn.Module):
        raise InputError(
            f"{config.path}: model.factory: expected it to return a torch.nn.Module, got {type(model).__name__}"
        )
    if config.model.checkpoint is not None:
        apply_checkpoint(model, read_checkpoint(config.model.checkpoint), config.model.checkpoint)
    return model.eval()
