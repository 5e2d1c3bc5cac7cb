"""The JSON sidecar that travels with every engine: what it is, what it accepts, what it was built for.

Kept free of onnx, torch and the backends so that a serving process (runtime/) can read it with the
standard library alone. The sidecar is ENGINE + ".json" (model.plan -> model.plan.json).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from miaotui.errors import InputError
from miaotui.workdir import sidecar_path

SIDECAR_FORMAT = 1


@dataclass(frozen=True)
class TensorRange:
    """One engine input: its dtype and the smallest, typical and largest shape it takes."""

    name: str
    dtype: str  # numpy name: int64, float32, ...
    dims: tuple[int | str, ...]  # the ONNX shape: ints fixed, strings symbolic
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    # The half-open [low, high) its values must lie in (the config's [inputs] range: token ids below the
    # vocabulary size); None: unchecked.
    values: tuple[float, float] | None = None

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(lo <= n <= hi for n, lo, hi in zip(shape, self.min, self.max))

    def range_text(self) -> str:
        return " .. ".join("x".join(map(str, s)) for s in (self.min, self.max))


def batch_axis_shared(inputs: list[TensorRange]) -> bool:
    """Axis 0 is a batch dim that may be split: one symbolic dim, the same in every input."""
    first = {t.dims[0] if t.dims else None for t in inputs}
    return len(first) == 1 and isinstance(next(iter(first)), str)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    dims: tuple[int | str, ...]


@dataclass
class EngineMetadata:
    backend: str  # onnxruntime | tensorrt | tensorrt-rtx
    backend_version: str
    precision: str  # fp32 | fp16 | int8 | int8-fp16: what the ONNX graph holds
    engine_file: str  # the engine's file name (the sidecar sits beside it)
    engine_sha256: str
    engine_bytes: int
    onnx_file: str
    onnx_sha256: str
    inputs: list[TensorRange]
    outputs: list[TensorInfo]
    device: dict[str, Any]  # what it was built for: CPU and provider, GPU, or compute capabilities
    settings: dict[str, Any]  # build settings (optimization level, workspace, ...)
    session: dict[str, Any] = field(default_factory=dict)  # what the runtime must set (onnxruntime)
    network: dict[str, Any] = field(default_factory=dict)  # what the builder saw: layer/node counts
    checks: dict[str, Any] = field(default_factory=dict)  # what the build verified
    build_seconds: float = 0.0
    built_at: str = ""
    miaotui_version: str = ""
    format: int = SIDECAR_FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def input(self, name: str) -> TensorRange:
        return next(t for t in self.inputs if t.name == name)


def _require(data: dict, key: str, kind, where: str):
    if key not in data:
        raise InputError(f"{where}: key '{key}' is missing")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise InputError(f"{where}: key '{key}' should be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _shape(value, where: str, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise InputError(f"{where}: key '{key}' should be a list of non-negative ints, got {value!r}")
    return tuple(value)


# What the runtime reads from the sidecar's "session" (the build's measured choices): a wrong type there
# would surface as a traceback on the first call, so it is refused on load like any other key.
SESSION_KEYS = {"max_call_elements": "positive int", "width_step": "positive int", "one_text_fixed": "bool",
                "graph_optimization_level": "str", "format": "str", "providers": "list of str"}


def _session(data: dict, where: str) -> dict[str, Any]:
    session = data.get("session", {})
    if not isinstance(session, dict):
        raise InputError(f"{where}: key 'session' should be an object, got {type(session).__name__}")
    checks = {"positive int": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
              "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
              "list of str": lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v)}
    for key, value in session.items():
        expected = SESSION_KEYS.get(key)
        if expected is not None and not checks[expected](value):
            raise InputError(f"{where}: key 'session.{key}' should be a {expected}, got {value!r}")
    if "call_ms" in session:  # the openvino build's times per call shape (engines/openvino_shapes.py)
        from miaotui.engines.openvino_shapes import call_costs_problem

        problem = call_costs_problem(session["call_ms"])
        if problem:
            raise InputError(f"{where}: key 'session.call_ms' should be a table of call times ({problem})")
    return session


def read_metadata(engine: str | Path) -> EngineMetadata:
    """The sidecar of `engine`, checked key by key (one line naming the file and key when wrong)."""
    from miaotui.engines.backend import backend_names

    path = sidecar_path(engine)
    if not path.is_file():
        raise InputError(f"{path}: the engine's sidecar is missing (rebuild with 'miaotui build')")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a JSON sidecar ({error})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    where = str(path)
    if data.get("format") != SIDECAR_FORMAT:
        raise InputError(f"{where}: key 'format' is {data.get('format')!r}, this miaotui reads {SIDECAR_FORMAT} (rebuild the engine)")
    backend = _require(data, "backend", str, where)
    if backend not in backend_names():
        raise InputError(f"{where}: key 'backend' is {backend!r}, expected one of {', '.join(backend_names())}")
    inputs = []
    for index, entry in enumerate(_require(data, "inputs", list, where)):
        key = f"inputs[{index}]"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: key '{key}' should be an object")
        ranges = {which: _shape(entry.get(which), where, f"{key}.{which}") for which in ("min", "opt", "max")}
        if not len(ranges["min"]) == len(ranges["opt"]) == len(ranges["max"]) or any(
                not lo <= mid <= hi for lo, mid, hi in zip(ranges["min"], ranges["opt"], ranges["max"])):
            raise InputError(f"{where}: key '{key}' needs min <= opt <= max of one rank, got {ranges}")
        values = entry.get("values")
        if values is not None and not (isinstance(values, list) and len(values) == 2 and values[0] < values[1]
                                       and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
            raise InputError(f"{where}: key '{key}.values' should be [low, high) with low < high, got {values!r}")
        inputs.append(TensorRange(_require(entry, "name", str, where), _require(entry, "dtype", str, where),
                                  tuple(entry.get("dims", ranges["max"])), **ranges,
                                  values=tuple(values) if values is not None else None))
    if not inputs:
        raise InputError(f"{where}: key 'inputs' is empty: the engine's shape ranges are unknown (rebuild the engine)")
    outputs = [TensorInfo(_require(o, "name", str, where), _require(o, "dtype", str, where), tuple(o.get("dims", ())))
               for o in _require(data, "outputs", list, where)]
    return EngineMetadata(
        backend=backend,
        backend_version=_require(data, "backend_version", str, where),
        precision=_require(data, "precision", str, where),
        engine_file=_require(data, "engine_file", str, where),
        engine_sha256=_require(data, "engine_sha256", str, where),
        engine_bytes=_require(data, "engine_bytes", int, where),
        onnx_file=_require(data, "onnx_file", str, where),
        onnx_sha256=_require(data, "onnx_sha256", str, where),
        inputs=inputs,
        outputs=outputs,
        device=_require(data, "device", dict, where),
        settings=_require(data, "settings", dict, where),
        session=_session(data, where),
        network=data.get("network", {}),
        checks=data.get("checks", {}),
        build_seconds=float(data.get("build_seconds", 0.0)),
        built_at=str(data.get("built_at", "")),
        miaotui_version=str(data.get("miaotui_version", "")),
    )
