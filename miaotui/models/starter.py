"""`miaotui init`: a commented starter config from a Hugging Face folder or a `file.py:function` factory.

From a folder the config is complete (the folder describes inputs, labels and tokenizer; only the
data files are the user's to name). From a factory, the inputs come from forward()'s signature and
whatever cannot be known without the user (dtypes of unusual inputs, dims, outputs) is a guess
marked `# TODO`. Either way the text is loaded back with load_config before it is written, so
`miaotui init` never writes a config that `miaotui run` would refuse to read.
"""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path

from miaotui.config import NAME_PATTERN, TEXT_SUFFIXES, parse_config
from miaotui.errors import InputError

TEXT_INPUT_HINTS = {  # forward() argument -> its usual [inputs] entry in a text classifier
    "input_ids": '{ dtype = "int64", shape = ["batch", "seq"] }  # range: the tokenizer\'s vocabulary',
    "attention_mask": '{ dtype = "int64", shape = ["batch", "seq"], padding_mask = true }',
    "token_type_ids": '{ dtype = "int64", shape = ["batch", "seq"], range = [0, 2] }',
}
DATA_HELP = """\
# Texts for INT8 calibration (a few hundred typical ones) and for the parity gate (with labels, it
# checks accuracy too): .csv, .tsv, .jsonl or .parquet with a "text" column and an optional "label"
# column (class names or indices); or an .npz of arrays named like the inputs; or "module:function"."""


@dataclass(frozen=True)
class Starter:
    text: str  # the config file's content
    complete: bool  # nothing marked TODO but the data files


def _name(raw: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.") or "model"
    return name if NAME_PATTERN.match(name) else f"model-{name}"


def _relative(path: Path, config_path: Path) -> str:
    return Path(os.path.relpath(path.resolve(), config_path.parent.resolve())).as_posix()


def _data_lines(config_path: Path, calibration: Path | None, validation: Path | None) -> list[str]:
    lines = ["", "[data]", DATA_HELP]
    for key, path in (("calibration", calibration), ("validation", validation)):
        if path is None:
            lines.append(f'# {key} = "{key}.csv"  # TODO: your file')
            continue
        if path.suffix.lower() not in (".npz", *TEXT_SUFFIXES):
            raise InputError(f"{path}: --{key}: expected a {', '.join(TEXT_SUFFIXES)} or .npz file")
        if not path.is_file():
            raise InputError(f"{path}: --{key}: file does not exist")
        lines.append(f'{key} = "{_relative(path, config_path)}"')
    return lines


def from_huggingface(folder: Path, config_path: Path, calibration: Path | None = None,
                     validation: Path | None = None) -> Starter:
    from miaotui.huggingface_folder import default_dims, read_folder

    described = read_folder(folder.resolve(), str(folder))
    dims = default_dims(described)
    lines = [
        f"# miaotui config for {folder} ({described.family}, {len(described.labels)} labels), "
        "written by `miaotui init`.",
        f'name = "{_name(folder.resolve().name)}"  # names the work dir: build/<name>',
        "",
        "[model]",
        f'huggingface = "{_relative(folder, config_path)}"',
        f"# From the folder: labels {', '.join(described.labels)} (id2label); inputs "
        f"{', '.join(described.input_names)}; tokenizer "
        f"{'tokenizer.json' if described.tokenizer else 'none (texts cannot be tokenized: add tokenizer.json)'}; "
        "output logits.",
        "",
        "[dims]",
        "# The engine's shape ranges (TensorRT optimization profiles; the parity checks run at min and max).",
        f"batch = {{ min = {dims['batch'][0]}, opt = {dims['batch'][1]}, max = {dims['batch'][2]} }}",
        f"seq = {{ min = {dims['seq'][0]}, opt = {dims['seq'][1]}, max = {dims['seq'][2]} }}  "
        f"# tokens; the folder's position embeddings cover {described.max_positions}",
        *_data_lines(config_path, calibration, validation),
    ]
    return Starter("\n".join(lines) + "\n", complete=described.tokenizer is not None)


def from_factory(factory: str, config_path: Path, calibration: Path | None = None,
                 validation: Path | None = None) -> Starter:
    """Inputs from the built model's forward() signature; a tokenizer.json beside the file is used."""
    from miaotui.models.loading import load_factory

    file_part, _, function = factory.rpartition(":")
    source = Path(file_part)
    if source.suffix != ".py" or not function.isidentifier():
        raise InputError(f"{factory}: expected a Hugging Face folder or 'file.py:function'")
    if not source.is_file():
        raise InputError(f"{source}: file does not exist")
    build = load_factory(f"{source.resolve()}:{function}", config_path)
    try:
        model = build()
        parameters = inspect.signature(model.forward).parameters
    except Exception as error:
        raise InputError(f"{factory}: building the model to read forward()'s arguments failed: "
                         f"{type(error).__name__}: {error}") from error
    names = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and p.default is p.empty]
    if not names:
        raise InputError(f"{factory}: {type(model).__name__}.forward takes no named arguments without defaults")
    tokenizer = source.resolve().parent / "tokenizer.json"
    lines = [
        f"# miaotui config for {factory} ({type(model).__name__}), written by `miaotui init`.",
        "# Lines marked TODO are guesses: check them before `miaotui run`.",
        f'name = "{_name(source.stem)}"  # names the work dir: build/<name>',
        "",
        "[model]",
        f'factory = "{_relative(source, config_path)}:{function}"',
        '# checkpoint = "weights.safetensors"  # TODO: the trained weights, if the factory does not load them',
        'outputs = ["logits"]  # TODO: the names of what forward() returns (the first ones of a tuple, or dict keys)',
        '# labels = ["negative", "positive"]  # TODO: class names, in index order',
    ]
    if tokenizer.is_file():
        lines.append(f'tokenizer = "{_relative(tokenizer, config_path)}"  # turns texts into input_ids')
    else:
        lines.append('# tokenizer = "tokenizer.json"  # TODO: a tokenizers-library file, to feed texts')
    lines += ["", "[inputs]", "# One entry per forward() argument: dtype, shape (sizes or [dims] names), range."]
    uses_seq = False
    for name in names:
        if name in TEXT_INPUT_HINTS and (name != "input_ids" or tokenizer.is_file()):
            lines.append(f"{name} = {TEXT_INPUT_HINTS[name]}")
            uses_seq = True
        elif name == "input_ids":
            lines.append(f'{name} = {{ dtype = "int64", shape = ["batch", "seq"], range = [0, 30000] }}  '
                         "# TODO: range = [0, vocabulary size)")
            uses_seq = True
        else:
            lines.append(f'{name} = {{ dtype = "float32", shape = ["batch", 1] }}  # TODO: dtype and shape')
    lines += ["", "[dims]", "# The engine's shape ranges (TensorRT optimization profiles; the parity checks run at "
              "min and max).", "batch = { min = 1, opt = 8, max = 64 }  # TODO: the batch sizes you serve"]
    if uses_seq:
        lines.append("seq = { min = 1, opt = 128, max = 256 }  # TODO: tokens per text, the longest you take")
    lines += _data_lines(config_path, calibration, validation)
    return Starter("\n".join(lines) + "\n", complete=False)


def starter_config(source: str, config_path: Path, calibration: Path | None = None,
                   validation: Path | None = None) -> Starter:
    """The starter for `source` (a folder or file.py:function), checked by parsing it as `config_path`."""
    import tomllib

    folder = Path(source)
    if folder.is_dir():
        starter = from_huggingface(folder, config_path, calibration, validation)
    else:
        starter = from_factory(source, config_path, calibration, validation)
    parse_config(tomllib.loads(starter.text), config_path.resolve())  # an InputError here is our bug, not theirs
    return starter
