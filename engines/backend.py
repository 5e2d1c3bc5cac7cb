"""The backend interface and its registry: what an engine kind must say and do.

A backend is one module that defines a `BACKEND` object (a subclass of `Backend`) and is named
once in BACKEND_MODULES below. Everything else (the CLI's --backend choices, the build stage,
Engine.load's dispatch, engine choice in a work dir, Triton packaging) asks this registry. A
backend module imports its library lazily, inside its methods: the registry, and with it the
runtime, loads with the standard library and numpy alone.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from miaotui.errors import InputError

if TYPE_CHECKING:
    from miaotui.config import Config
    from miaotui.engines.build import BuildOptions
    from miaotui.engines.metadata import EngineMetadata, TensorRange

# One line per backend: the module that declares it (this order is the order of --help and of builds).
BACKEND_MODULES = (
    "miaotui.engines.onnxruntime_backend",
    "miaotui.engines.tensorrt_backend",
    "miaotui.engines.tensorrt_rtx_backend",
    "miaotui.engines.openvino_backend",
)


@dataclass
class BuildJob:
    """What a backend's build gets: the graph, where to write the engine, and the resolved shapes."""

    onnx_path: Path
    engine_path: Path  # a staging path: renamed into place by the caller when everything passed
    engine_name: str  # the engine's final file name, for messages
    options: "BuildOptions"
    ranges: list["TensorRange"]
    precision: str  # what the graph holds
    foreign_domains: tuple[str, ...]  # op domains beyond plain ONNX (ONNX Runtime's contrib ops)
    config: "Config | None"
    cache_path: Path  # a timing cache's home, for backends that keep one
    # Another file of the engine (weights beside it), by its name in the engine's folder: the staging
    # path to write; renamed into place with the engine when the build succeeds, removed when it fails.
    stage_file: Callable[[str], Path]


@dataclass
class BackendBuild:
    """What a backend's build reports; the sidecar is written from it."""

    version: str
    device: dict[str, Any]  # what the engine was built for: CPU flags and provider, GPU, compute capabilities
    settings: dict[str, Any]  # build settings
    checks: dict[str, Any]  # what the build verified
    session: dict[str, Any] = field(default_factory=dict)  # what the runtime must set when loading
    network: dict[str, Any] = field(default_factory=dict)  # what the builder saw, beyond the ONNX node counts
    warnings: list[str] = field(default_factory=list)
    # What the build decided by timing on this machine's CPUs (e.g. "call split"): decisions that a busy
    # machine can get wrong, so the build records how busy it was (engines/timing.cpu_use).
    timed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TensorSignature:
    """What a loaded engine itself says of one input or output: what the sidecar must agree with."""

    name: str
    dtype: str  # numpy name
    dims: tuple[int | None, ...]  # fixed sizes; None where the engine takes a range
    bounds: tuple[tuple[int, int] | None, ...] | None = None  # per dim [min, max] where the engine knows them


class Runner(Protocol):
    """A loaded engine: `run` takes arrays by input name and returns the outputs in sidecar order;
    `signature` is what the engine itself reports of its inputs and outputs."""

    provider: str  # what really runs it, e.g. CPUExecutionProvider

    def run(self, arrays: dict[str, Any]) -> list: ...

    def signature(self) -> tuple[list[TensorSignature], list[TensorSignature]]: ...


class Backend:
    """One engine kind. Subclasses set the class attributes and implement build/open/check_machine."""

    name: str = ""
    suffix: str = ""  # the engine file's suffix
    help: str = ""  # one line for --help
    triton_platform: str | None = None  # Triton's platform for this engine kind (config.pbtxt `platform`)
    triton_backend: str | None = None  # ... or Triton's backend for it (config.pbtxt `backend`); neither: not served
    preference: int = 50  # lower first, when a work dir holds several engines that can run (GPU plans first)
    runtime_module: str | None = None  # the module miaotui.runtime imports to run its engines (where it is one)
    # What miaotui does to a graph before the library builds it; part of the build stage's key, so a
    # work dir's engines are rebuilt when it changes (bump it with the backend's rewrites or settings).
    form: str = "1"

    def version(self) -> str:
        """The library's version (recorded in the sidecar and the build stage's key)."""
        raise NotImplementedError

    def installed(self) -> bool:
        """Its library imports here (cheap: no import is made)."""
        return self.runtime_module is None or importlib.util.find_spec(self.runtime_module) is not None

    def builds_by_default(self) -> bool:
        """Part of `miaotui run` when no --backend is given."""
        return False

    def check_options(self, options: "BuildOptions") -> None:
        """Refuse options it cannot honour, before anything is built."""

    def build(self, job: BuildJob) -> BackendBuild:
        raise NotImplementedError

    def cannot_run_here(self) -> str | None:
        """Why this machine cannot run its engines at all (None: it may; check_machine says for one engine)."""
        return None

    def check_machine(self, path: Path, metadata: "EngineMetadata") -> None:
        """Refuse, in one line that says what to rebuild, an engine this machine cannot run."""

    def open(self, path: Path, metadata: "EngineMetadata", threads: int | None) -> Runner:
        raise NotImplementedError

    def describe(self, metadata: "EngineMetadata") -> str:
        """One line: what was built and checked (the summary tables)."""
        return f"{self.name} {metadata.backend_version}"

    def layers(self, path: Path, metadata: "EngineMetadata") -> tuple[list[dict[str, Any]], str | None]:
        """The engine's layers and their precisions, or ([], why not)."""
        return [], None

    def engine_files(self, engine: Path) -> list[Path]:
        """Files beside the engine that belong to it (copied with it wherever it goes)."""
        return []

    def triton_model(self, engine: Path, metadata: "EngineMetadata", target: Path, config: "Config | None") -> str:
        """Write what Triton's backend for `triton_platform` loads into `target` (a version folder);
        returns the file name."""
        raise InputError(f"{engine}: a {self.name} engine; Triton serves {' and '.join(triton_backends())} engines")

    def triton_parameters(self, metadata: "EngineMetadata") -> dict[str, str]:
        """config.pbtxt `parameters` for Triton's backend, so that it runs the engine as built."""
        return {}

    def triton_differences(self, metadata: "EngineMetadata") -> list[str]:
        """What Triton's backend still runs differently from the engine the gate judged, one sentence each."""
        return []

    def on_gpu(self, metadata: "EngineMetadata") -> bool:
        """Its Triton instances run on a GPU."""
        return metadata.device.get("kind") == "gpu"


def is_torch(value) -> bool:
    """A torch tensor, known without importing torch."""
    return type(value).__module__.startswith("torch")


def numpy_feed(arrays: dict[str, Any]) -> dict[str, Any]:
    """The inputs as numpy arrays, for a runner that takes no torch tensors."""
    return {name: value.cpu().numpy() if is_torch(value) else value for name, value in arrays.items()}


def run_failed(backend: str, feed: dict[str, Any], error: Exception) -> InputError:
    """One line for a backend error on inputs that passed the sidecar's checks."""
    from miaotui.errors import first_line

    shapes = ", ".join(f"{name} {list(value.shape)}" for name, value in feed.items())
    return InputError(f"{backend} failed on inputs {shapes}: {first_line(error)}")


def version_tuple(text: str) -> tuple[int, ...]:
    """"1.23.2" -> (1, 23, 2); "2026.4.1-22982-..." -> (2026, 4, 1): for not-older-than checks."""
    parts = []
    for part in text.split("-")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@functools.cache
def registry() -> dict[str, Backend]:
    backends = {}
    for module_name in BACKEND_MODULES:
        backend = importlib.import_module(module_name).BACKEND
        backends[backend.name] = backend
    return backends


def get_backend(name: str) -> Backend:
    try:
        return registry()[name]
    except KeyError:
        raise InputError(f"--backend {name}: expected one of {', '.join(backend_names())}") from None


def backend_names() -> tuple[str, ...]:
    return tuple(registry())


def engine_suffixes() -> tuple[str, ...]:
    return tuple(dict.fromkeys(b.suffix for b in registry().values()))


def default_backends() -> list[str]:
    """What `miaotui run` builds when no --backend is given."""
    return [b.name for b in registry().values() if b.builds_by_default()]


def preference_order() -> tuple[str, ...]:
    """Backend names, the one to prefer first (WorkDir.choose_engine's order)."""
    return tuple(sorted(registry(), key=lambda name: registry()[name].preference))


def triton_backends() -> tuple[str, ...]:
    return tuple(b.name for b in registry().values() if b.triton_platform or b.triton_backend)
