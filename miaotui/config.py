"""The TOML config that describes one model, as typed dataclasses validated on load.

Every mistake is reported as one line naming the file, the key and what was expected (InputError,
exit status 2). Unknown keys are mistakes too: a misspelt option must not be silently ignored.
Paths in a config are relative to the config file's folder and are resolved on load.
"""

from __future__ import annotations

import re
import sys
import tomllib
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miaotui.errors import InputError

DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
FLOAT_DTYPES = ("float32", "float16", "float64")
PRECISIONS = ("fp32", "fp16", "int8", "int8-fp16")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Opset 20 is what torch.onnx 2.13 writes natively (others go through onnx's version converter, the
# exporter's least tested step); it has LayerNormalization (17) and Gelu (20), and both ONNX Runtime
# and TensorRT 10/11's ONNX parser cover it.
DEFAULT_OPSET = 20


@dataclass(frozen=True)
class Dim:
    """A dynamic dimension's range; min/opt/max become TensorRT optimization profiles later."""

    name: str
    min: int
    opt: int
    max: int

    @property
    def is_static(self) -> bool:
        return self.min == self.max


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # ints are fixed sizes, strings name a [dims] entry
    range: tuple[float, float] | None  # half-open [low, high) for synthetic samples; None for bool
    padding_mask: bool = False  # 1 marks a real position, 0 padding (an attention mask)

    def dims(self) -> list[str]:
        return [d for d in self.shape if isinstance(d, str)]


@dataclass(frozen=True)
class ModelSpec:
    factory: str | None  # "file.py:function" (resolved to an absolute path) or "package.module:function"
    checkpoint: Path | None = None
    outputs: tuple[str, ...] = ("logits",)
    labels: tuple[str, ...] | None = None
    tokenizer: Path | None = None
    huggingface: Path | None = None  # a save_pretrained folder, instead of a factory


TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")


@dataclass(frozen=True)
class DataSpec:
    calibration: str | None = None  # an absolute .npz or text file path (TEXT_SUFFIXES), or "module:function"
    validation: str | None = None
    text_column: str = "text"  # the columns of a text file
    text_pair_column: str | None = None  # the second text of a pair classifier
    label_column: str = "label"  # optional in the file; class names (model.labels) or integers


@dataclass(frozen=True)
class ExportSpec:
    opset: int = DEFAULT_OPSET


QUANTIZE_METHODS = ("minmax", "entropy", "percentile")
# The parity gate's bars, keys of a [validate.PRECISION] table (what each reads: validation/thresholds.py).
VALIDATE_BARS = ("max_abs_error", "max_mean_abs_error", "max_rel_error", "min_cosine", "min_top1_agreement",
                 "min_topk_agreement", "max_kl_divergence", "max_accuracy_drop")


@dataclass(frozen=True)
class QuantizeSpec:
    # percentile (99.999th of each activation's histogram): on the built-in models at the current recipe it
    # agreed with FP32 at least as often as minmax on every split (minilm-sentiment test 0.9994 against
    # 0.9966, lstm-sentiment validation 1.0000 against 0.9989; docs/quantization.md). It needs 16 samples.
    method: str = "percentile"
    samples: int | None = 512  # calibration samples; None = the whole calibration set
    # SmoothQuant migration strength for INT8 MatMul inputs; 0 = off. 0.8: on minilm-sentiment the logit-margin
    # error RMS on held-out calibration texts was 0.072 at 0.5, 0.060 at 0.65, 0.049 at 0.8 and 0.9, 0.052 at
    # 0.95, and on the test split 0.052 at 0.8 against 0.054 at 0.85 (benchmarks/NOTES.md): what was left of
    # its INT8 error came from the LayerNorm outputs' step, not from the weights'.
    smooth_alpha: float = 0.8
    include: tuple[str, ...] = ()  # node-name or op-type globs forced to INT8
    exclude: tuple[str, ...] = ()  # node-name or op-type globs kept in float
    # Search for the fewest nodes kept in float that meet this top-1 agreement (export/search.py); None = rules
    target_top1_agreement: float | None = None
    bias_correction: bool = True  # subtract each INT8 node's mean error from its float bias (export/bias_correction.py)


@dataclass(frozen=True)
class Config:
    name: str
    path: Path
    model: ModelSpec
    inputs: dict[str, InputSpec]
    dims: dict[str, Dim]
    data: DataSpec = field(default_factory=DataSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    quantize: QuantizeSpec = field(default_factory=QuantizeSpec)
    validate: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.path.parent

    def shape_at(self, input_name: str, sizes: dict[str, int]) -> tuple[int, ...]:
        """The concrete shape of one input with each named dim taken from `sizes`."""
        return tuple(d if isinstance(d, int) else sizes[d] for d in self.inputs[input_name].shape)

    @property
    def padding_mask(self) -> str | None:
        """The input marked `padding_mask = true`, if any."""
        return next((name for name, spec in self.inputs.items() if spec.padding_mask), None)

    def sizes(self, which: str) -> dict[str, int]:
        """Every dim at its "min", "opt" or "max"."""
        return {name: getattr(dim, which) for name, dim in self.dims.items()}

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain TOML-ready data (absolute paths), as written to a work dir."""
        model: dict[str, Any] = {"outputs": list(self.model.outputs)}
        if self.model.factory:
            model["factory"] = self.model.factory
        if self.model.huggingface:
            model["huggingface"] = str(self.model.huggingface)
        if self.model.checkpoint:
            model["checkpoint"] = str(self.model.checkpoint)
        if self.model.labels:
            model["labels"] = list(self.model.labels)
        if self.model.tokenizer:
            model["tokenizer"] = str(self.model.tokenizer)
        inputs = {}
        for spec in self.inputs.values():
            entry: dict[str, Any] = {"dtype": spec.dtype, "shape": list(spec.shape)}
            if spec.range is not None:
                entry["range"] = list(spec.range)
            if spec.padding_mask:
                entry["padding_mask"] = True
            inputs[spec.name] = entry
        data: dict[str, Any] = {k: v for k, v in (("calibration", self.data.calibration),
                                                  ("validation", self.data.validation)) if v}
        defaults = DataSpec()
        for key in ("text_column", "text_pair_column", "label_column"):
            if getattr(self.data, key) != getattr(defaults, key):
                data[key] = getattr(self.data, key)
        out: dict[str, Any] = {
            "name": self.name,
            "model": model,
            "inputs": inputs,
            "dims": {d.name: {"min": d.min, "opt": d.opt, "max": d.max} for d in self.dims.values()},
            "export": {"opset": self.export.opset},
        }
        if data:
            out["data"] = data
        quantize: dict[str, Any] = {"method": self.quantize.method, "smooth_alpha": self.quantize.smooth_alpha,
                                    "include": list(self.quantize.include),
                                    "exclude": list(self.quantize.exclude)}
        if self.quantize.samples is not None:
            quantize["samples"] = self.quantize.samples
        if self.quantize.target_top1_agreement is not None:
            quantize["target_top1_agreement"] = self.quantize.target_top1_agreement
        quantize["bias_correction"] = self.quantize.bias_correction
        out["quantize"] = quantize
        if self.validate:
            out["validate"] = self.validate
        return out


class _Reader:
    """Walks the parsed TOML, turning every mistake into one line that names file and key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, message: str) -> InputError:
        return InputError(f"{self.path}: {key}: {message}")

    def table(self, parent: dict, key: str, where: str, required: bool = True) -> dict:
        if key not in parent:
            if required:
                raise self.fail(where, "missing (required table)")
            return {}
        value = parent[key]
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a table, got {_show(value)}")
        return value

    def only(self, table: dict, allowed: tuple[str, ...], where: str) -> None:
        unknown = [k for k in table if k not in allowed]
        if unknown:
            prefix = f"{where}." if where else ""
            raise self.fail(f"{prefix}{unknown[0]}", f"unknown key (expected one of: {', '.join(allowed)})")

    def value(self, table: dict, key: str, kind: type | tuple[type, ...], where: str, required: bool = True):
        if key not in table:
            if required:
                raise self.fail(where, "missing (required)")
            return None
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a TOML true is never a valid size or number.
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise self.fail(where, f"expected {' or '.join(k.__name__ for k in kinds)}, got {_show(value)}")
        return value

    def relative_path(self, raw: str, where: str, must_exist: bool = True) -> Path:
        path = (self.path.parent / raw).resolve()
        if must_exist and not path.exists():
            raise self.fail(where, f"file {raw!r} does not exist (looked for {path})")
        return path


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def is_callable_reference(raw: str) -> bool:
    """"package.module:function" rather than a file path (a file may also be "file.py:function")."""
    head, sep, tail = raw.rpartition(":")
    return bool(sep) and not head.endswith(".py") and "/" not in head and bool(tail)


@contextmanager
def folder_importable(config: Config):
    """The config's folder first on the import path while its factory or data function runs, so that
    a model.py can import the modules beside it."""
    folder = str(config.folder)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with suppress(ValueError):
            sys.path.remove(folder)


def load_config(path: str | Path) -> Config:
    path = Path(path).resolve()
    if not path.is_file():
        raise InputError(f"{path}: config file does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not valid TOML: {error}") from error
    return parse_config(raw, path)


def parse_config(raw: dict, path: Path) -> Config:
    r = _Reader(path)
    r.only(raw, ("name", "model", "inputs", "dims", "data", "export", "quantize", "validate"), "")
    name = r.value(raw, "name", str, "name")
    if not NAME_PATTERN.match(name):
        raise r.fail("name", f"expected letters, digits, '.', '_' or '-' (it names a folder), got {name!r}")

    model_table = r.table(raw, "model", "model")
    folder = _huggingface_folder(r, model_table)
    dims = _parse_dims(r, r.table(raw, "dims", "dims", required=False))
    inputs_table = r.table(raw, "inputs", "inputs", required=folder is None)
    if folder is not None:
        from miaotui.huggingface_folder import default_dims, default_inputs

        # The folder describes the model; [dims] and [inputs] entries, where given, override it.
        dims = {name: Dim(name, *sizes) for name, sizes in default_dims(folder).items()} | dims
        inputs_table = inputs_table or default_inputs(folder)
        if dims["seq"].max > folder.max_positions:
            raise r.fail("dims.seq.max", f"{folder.path} covers {folder.max_positions} positions "
                         f"(max_position_embeddings), got {dims['seq'].max}")
    model = _parse_model(r, model_table, folder)
    inputs = _parse_inputs(r, inputs_table, dims, _default_ranges(r, model, inputs_table))
    used = {d for spec in inputs.values() for d in spec.dims()}
    for dim_name in dims:
        if dim_name not in used:
            raise r.fail(f"dims.{dim_name}", "not used by any input's shape")
    return Config(
        name=name,
        path=path,
        model=model,
        inputs=inputs,
        dims=dims,
        data=_parse_data(r, r.table(raw, "data", "data", required=False)),
        export=_parse_export(r, r.table(raw, "export", "export", required=False)),
        quantize=_parse_quantize(r, r.table(raw, "quantize", "quantize", required=False)),
        validate=_parse_validate(r, r.table(raw, "validate", "validate", required=False)),
    )


def _huggingface_folder(r: _Reader, table: dict):
    """The [model] huggingface folder's description, or None for a factory model."""
    raw = r.value(table, "huggingface", str, "model.huggingface", required=False)
    if raw is None:
        if "factory" not in table:
            raise r.fail("model.factory", "missing (required: a torch module's 'file.py:function'; or "
                         "model.huggingface, a save_pretrained folder)")
        return None
    for key in ("factory", "checkpoint"):
        if key in table:
            raise r.fail(f"model.{key}", "not with model.huggingface: the folder holds the model and its weights")
    from miaotui.huggingface_folder import read_folder

    return read_folder(r.relative_path(raw, "model.huggingface"), f"{r.path}: model.huggingface")


def _parse_model(r: _Reader, table: dict, folder=None) -> ModelSpec:
    r.only(table, ("factory", "huggingface", "checkpoint", "outputs", "labels", "tokenizer"), "model")
    factory = None
    if folder is None:
        factory = r.value(table, "factory", str, "model.factory")
        file_part, sep, function = factory.rpartition(":")
        if not sep or not file_part or not function.isidentifier():
            raise r.fail("model.factory", f"expected 'file.py:function' or 'package.module:function', got {factory!r}")
        if not is_callable_reference(factory):
            factory = f"{r.relative_path(file_part, 'model.factory')}:{function}"

    checkpoint = r.value(table, "checkpoint", str, "model.checkpoint", required=False)
    checkpoint_path = None
    if checkpoint is not None:
        checkpoint_path = r.relative_path(checkpoint, "model.checkpoint")
        if checkpoint_path.suffix not in (".safetensors", ".pt", ".pth"):
            raise r.fail("model.checkpoint", f"expected a .safetensors, .pt or .pth file, got {checkpoint!r}")

    outputs = _string_list(r, table, "outputs", "model.outputs") or ("logits",)
    labels = _string_list(r, table, "labels", "model.labels")
    tokenizer = r.value(table, "tokenizer", str, "model.tokenizer", required=False)
    tokenizer_path = r.relative_path(tokenizer, "model.tokenizer") if tokenizer else None
    if folder is not None:
        if outputs != ("logits",):
            raise r.fail("model.outputs", f"a Hugging Face classifier exports one output, ['logits'], got {list(outputs)}")
        if labels is not None and len(labels) != len(folder.labels):
            raise r.fail("model.labels", f"{folder.path} has {len(folder.labels)} labels (id2label), got {len(labels)}")
        labels = labels or folder.labels
        tokenizer_path = tokenizer_path or folder.tokenizer
    return ModelSpec(
        factory=factory,
        checkpoint=checkpoint_path,
        outputs=outputs,
        labels=labels,
        tokenizer=tokenizer_path,
        huggingface=folder.path if folder is not None else None,
    )


def _string_list(r: _Reader, table: dict, key: str, where: str) -> tuple[str, ...] | None:
    values = r.value(table, key, list, where, required=False)
    if values is None:
        return None
    if not values or not all(isinstance(v, str) and v for v in values):
        raise r.fail(where, "expected a non-empty list of non-empty strings")
    if len(set(values)) != len(values):
        raise r.fail(where, "names must be unique")
    return tuple(values)


def _parse_dims(r: _Reader, table: dict) -> dict[str, Dim]:
    dims = {}
    for name, entry in table.items():
        where = f"dims.{name}"
        if not isinstance(entry, dict):
            raise r.fail(where, f"expected a table {{ min = ..., opt = ..., max = ... }}, got {_show(entry)}")
        r.only(entry, ("min", "opt", "max"), where)
        lo, hi = r.value(entry, "min", int, f"{where}.min"), r.value(entry, "max", int, f"{where}.max")
        opt = r.value(entry, "opt", int, f"{where}.opt", required=False)
        opt = hi if opt is None else opt
        if lo < 1:
            raise r.fail(f"{where}.min", f"expected at least 1, got {lo}")
        if lo > hi:
            raise r.fail(where, f"min ({lo}) must not exceed max ({hi})")
        if not lo <= opt <= hi:
            raise r.fail(f"{where}.opt", f"expected between min ({lo}) and max ({hi}), got {opt}")
        dims[name] = Dim(name, lo, opt, hi)
    return dims


def _default_ranges(r: _Reader, model: ModelSpec, inputs_table: dict) -> dict[str, tuple[float, float]]:
    """Ranges a text model's inputs take without a `range` key: token ids over the tokenizer's
    vocabulary (the tokenizer is read only when input_ids has no range), a 0/1 mask."""
    ranges: dict[str, tuple[float, float]] = {"attention_mask": (0, 2)}
    ids = inputs_table.get("input_ids")
    if model.tokenizer is not None and isinstance(ids, dict) and "range" not in ids:
        from tokenizers import Tokenizer

        try:
            ranges["input_ids"] = (0, Tokenizer.from_file(str(model.tokenizer)).get_vocab_size(with_added_tokens=True))
        except Exception as error:  # the library raises a bare Exception on malformed JSON
            raise r.fail("model.tokenizer", f"{model.tokenizer} is not a tokenizer.json file ({error})") from None
    return ranges


def _parse_inputs(r: _Reader, table: dict, dims: dict[str, Dim],
                  default_ranges: dict[str, tuple[float, float]]) -> dict[str, InputSpec]:
    if not table:
        raise r.fail("inputs", "expected at least one input")
    inputs = {}
    for name, entry in table.items():
        where = f"inputs.{name}"
        if not name.isidentifier():
            raise r.fail(where, "input names must be Python identifiers (they are the forward() arguments)")
        if not isinstance(entry, dict):
            raise r.fail(where, f"expected a table {{ dtype = ..., shape = [...] }}, got {_show(entry)}")
        r.only(entry, ("dtype", "shape", "range", "padding_mask"), where)
        dtype = r.value(entry, "dtype", str, f"{where}.dtype")
        if dtype not in DTYPES:
            raise r.fail(f"{where}.dtype", f"expected one of {', '.join(DTYPES)}, got {dtype!r}")
        shape = r.value(entry, "shape", list, f"{where}.shape")
        if not shape:
            raise r.fail(f"{where}.shape", "expected at least one dimension")
        for dim in shape:
            if isinstance(dim, bool) or not isinstance(dim, (int, str)):
                raise r.fail(f"{where}.shape", f"expected sizes or names of [dims] entries, got {_show(dim)}")
            if isinstance(dim, int) and dim < 1:
                raise r.fail(f"{where}.shape", f"fixed sizes must be at least 1, got {dim}")
            if isinstance(dim, str) and dim not in dims:
                known = ", ".join(dims) or "none defined"
                raise r.fail(f"{where}.shape", f"dim {dim!r} is not defined in [dims] (defined: {known})")
        padding_mask = r.value(entry, "padding_mask", bool, f"{where}.padding_mask", required=False) or False
        if padding_mask and (dtype in FLOAT_DTYPES or len(shape) != 2):
            raise r.fail(f"{where}.padding_mask", f"a padding mask is an integer or bool (batch, sequence) input of "
                         f"0s and 1s, got {dtype} of shape {shape}")
        value_range = _parse_range(r, entry, dtype, f"{where}.range", default_ranges.get(name))
        inputs[name] = InputSpec(name, dtype, tuple(shape), value_range, padding_mask)
    masks = [name for name, spec in inputs.items() if spec.padding_mask]
    if len(masks) > 1:
        raise r.fail("inputs", f"at most one input is the padding mask, got {', '.join(masks)}")
    return inputs


def _parse_range(r: _Reader, entry: dict, dtype: str, where: str,
                 default: tuple[float, float] | None = None) -> tuple[float, float] | None:
    if dtype == "bool":
        if "range" in entry:
            raise r.fail(where, "bool inputs take no range")
        return None
    if "range" not in entry and default is not None and dtype not in FLOAT_DTYPES:
        return default
    bounds = r.value(entry, "range", list, where, required=dtype not in FLOAT_DTYPES)
    if bounds is None:
        return (0.0, 1.0)
    number = (float, int) if dtype in FLOAT_DTYPES else int
    if len(bounds) != 2 or not all(isinstance(b, number) and not isinstance(b, bool) for b in bounds):
        kind = "numbers" if dtype in FLOAT_DTYPES else "integers"
        raise r.fail(where, f"expected two {kind} [low, high) for a {dtype} input, got {bounds!r}")
    low, high = bounds
    if not low < high:
        raise r.fail(where, f"expected low < high (the range is half-open), got [{low}, {high}]")
    return (low, high)


def _parse_data(r: _Reader, table: dict) -> DataSpec:
    columns = ("text_column", "text_pair_column", "label_column")
    r.only(table, ("calibration", "validation", *columns), "data")
    resolved: dict[str, Any] = {}
    for key in ("calibration", "validation"):
        raw = r.value(table, key, str, f"data.{key}", required=False)
        if raw is None:
            continue
        if is_callable_reference(raw):
            resolved[key] = raw
            continue
        path = r.relative_path(raw, f"data.{key}")
        if path.suffix.lower() not in (".npz", *TEXT_SUFFIXES):
            raise r.fail(f"data.{key}", f"expected an .npz, {', '.join(TEXT_SUFFIXES)} file or \"module:function\", "
                         f"got {raw!r}")
        resolved[key] = str(path)
    for key in columns:
        value = r.value(table, key, str, f"data.{key}", required=False)
        if value is not None:
            if not value:
                raise r.fail(f"data.{key}", "expected a column name, got an empty string")
            resolved[key] = value
    return DataSpec(**resolved)


def _parse_export(r: _Reader, table: dict) -> ExportSpec:
    r.only(table, ("opset",), "export")
    opset = r.value(table, "opset", int, "export.opset", required=False)
    if opset is None:
        return ExportSpec()
    if not 17 <= opset <= 23:
        raise r.fail("export.opset", f"expected 17..23 (LayerNormalization needs 17; ONNX Runtime runs up to 23), got {opset}")
    return ExportSpec(opset=opset)


def _parse_quantize(r: _Reader, table: dict) -> QuantizeSpec:
    r.only(table, ("method", "samples", "smooth_alpha", "include", "exclude", "target_top1_agreement", "bias_correction"),
           "quantize")
    method = r.value(table, "method", str, "quantize.method", required=False) or QuantizeSpec.method
    if method not in QUANTIZE_METHODS:
        raise r.fail("quantize.method", f"expected one of {', '.join(QUANTIZE_METHODS)}, got {method!r}")
    samples = r.value(table, "samples", int, "quantize.samples", required=False)
    if samples is not None and samples < 1:
        raise r.fail("quantize.samples", f"expected a positive number of calibration samples, got {samples}")
    alpha = r.value(table, "smooth_alpha", (int, float), "quantize.smooth_alpha", required=False)
    if alpha is not None and not 0 <= alpha < 1:
        raise r.fail("quantize.smooth_alpha", f"expected 0 (off) up to, not including, 1, got {alpha}")
    target = r.value(table, "target_top1_agreement", (int, float), "quantize.target_top1_agreement", required=False)
    if target is not None and not 0 < target <= 1:
        raise r.fail("quantize.target_top1_agreement", f"expected a share above 0 up to 1, got {target}")
    bias_correction = r.value(table, "bias_correction", bool, "quantize.bias_correction", required=False)
    return QuantizeSpec(
        target_top1_agreement=float(target) if target is not None else None,
        bias_correction=QuantizeSpec.bias_correction if bias_correction is None else bias_correction,
        method=method,
        smooth_alpha=float(alpha) if alpha is not None else QuantizeSpec.smooth_alpha,
        samples=samples if samples is not None else QuantizeSpec.samples,
        include=_patterns(r, table, "include"),
        exclude=_patterns(r, table, "exclude"),
    )


def _patterns(r: _Reader, table: dict, key: str) -> tuple[str, ...]:
    """An include/exclude list of globs; empty is fine (nothing forced)."""
    values = r.value(table, key, list, f"quantize.{key}", required=False) or []
    if not all(isinstance(v, str) and v for v in values):
        raise r.fail(f"quantize.{key}", "expected a list of node-name or op-type patterns (non-empty strings)")
    return tuple(values)


def _parse_validate(r: _Reader, table: dict) -> dict[str, dict[str, float]]:
    r.only(table, PRECISIONS, "validate")
    out = {}
    for precision, bars in table.items():
        where = f"validate.{precision}"
        if not isinstance(bars, dict):
            raise r.fail(where, f"expected a table of thresholds, got {_show(bars)}")
        r.only(bars, VALIDATE_BARS, where)
        for key, value in bars.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise r.fail(f"{where}.{key}", f"expected a number, got {_show(value)}")
        out[precision] = {k: float(v) for k, v in bars.items()}
    return out
