"""Engine.load(path): an engine checked against its sidecar and this machine, safe to call from many threads.

    engine = Engine.load("build/lstm-sentiment/engines/lstm-sentiment.onnxruntime.int8.ort")
    outputs = engine(input_ids=ids)              # numpy in, numpy out; torch in, torch out
    outputs = engine.run({"input_ids": ids}, batch_size=16)

Dispatches through the backend registry (engines/backend.py). Imports nothing from export/, and
neither torch nor onnx to serve an onnxruntime engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from miaotui.artifacts import sha256_file
from miaotui.engines.backend import get_backend, numpy_feed
from miaotui.engines.call_split import row_slices, rows_per_call
from miaotui.engines.metadata import EngineMetadata, TensorInfo, TensorRange, batch_axis_shared, read_metadata
from miaotui.errors import InputError
from miaotui.runtime.inputs import is_torch, to_feed


class Engine:
    """A loaded engine. Build one with Engine.load(); `inputs` and `outputs` say what it takes and gives."""

    def __init__(self, path: Path, metadata: EngineMetadata, backend):
        self.path = path
        self.metadata = metadata
        self._backend = backend
        self._splittable = batch_axis_shared(metadata.inputs)
        self.max_batch = min(t.max[0] for t in metadata.inputs) if self._splittable else None
        # Input elements one call runs fastest under, as the build measured it (engines/call_split.py).
        self.max_call_elements = metadata.session.get("max_call_elements") if self._splittable else None
        # A few call shapes rather than every one (openvino: each new shape is prepared and cached; one text
        # may run on models compiled for its width): widths padded to a step, rows in powers of two.
        self.width_step = metadata.session.get("width_step") if self._splittable else None
        self.one_text_fixed = bool(self.width_step and metadata.session.get("one_text_fixed"))
        self._call_costs = None
        if self._splittable and "call_ms" in metadata.session:  # what each call shape costs, as built
            from miaotui.engines.openvino_shapes import CallCosts

            self._call_costs = CallCosts.from_json(metadata.session["call_ms"])
        self._batch_ms: dict[tuple[int, int], float] = {}

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> "Engine":
        """Read the sidecar, check the file and this machine against it, and open the backend.
        `threads`: ONNX Runtime's intra-op threads (default: ONNX Runtime's choice)."""
        path = Path(path)
        if path.is_dir():
            raise InputError(f"{path}: a folder; Engine.load takes an engine file (.ort, .plan); Classifier.load takes a work dir")
        if not path.is_file():
            raise InputError(f"{path}: engine file does not exist")
        metadata = read_metadata(path)
        if path.stat().st_size != metadata.engine_bytes or sha256_file(path) != metadata.engine_sha256:
            raise InputError(f"{path}: the file is not the engine its sidecar describes (sha256 differs: truncated, "
                             "damaged or replaced): rebuild it with 'miaotui build'")
        if threads is not None and threads < 1:
            raise InputError(f"threads={threads}: expected a positive number of threads")
        backend = get_backend(metadata.backend)
        backend.check_machine(path, metadata)
        runner = backend.open(path, metadata, threads)
        check_signature(path, metadata, runner)
        return cls(path, metadata, runner)

    @property
    def inputs(self) -> list[TensorRange]:
        return list(self.metadata.inputs)

    @property
    def outputs(self) -> list[TensorInfo]:
        return list(self.metadata.outputs)

    @property
    def backend(self) -> str:
        return self.metadata.backend

    @property
    def provider(self) -> str:
        """What really runs the engine (e.g. CPUExecutionProvider)."""
        return self._backend.provider

    @property
    def spinning_stopped(self) -> bool:
        """Whether its threads park when a call returns rather than spin for the next (where a backend spins)."""
        return bool(getattr(self._backend, "spinning_stopped", False))

    def padded_width(self, width: int) -> int:
        """The width to pad a call of `width` tokens to (Classifier.predict does; the model masks padding):
        the next multiple of the engine's width step where it has one (engines/openvino_shapes.py), else `width`."""
        if not self.width_step:
            return width
        from miaotui.engines.openvino_shapes import padded_width

        seq = self.metadata.inputs[0]
        return padded_width(width, self.width_step, seq.min[1], seq.max[1])

    @property
    def knows_call_costs(self) -> bool:
        """Whether the build measured what each call shape costs (`batch_ms` answers)."""
        return self._call_costs is not None

    def batch_ms(self, rows: int, width: int) -> float | None:
        """Estimated milliseconds of `rows` texts padded to `width` tokens (already a padded width), as `run`
        would run them (rows in powers of two, cut or copied up), from the build's times per call shape; None
        where the build measured none (Classifier.predict then prices batches in padded tokens)."""
        if self._call_costs is None:
            return None
        key = (rows, width)
        cost = self._batch_ms.get(key)
        if cost is None:  # a few hundred distinct keys: rows up to the max batch, widths at the step
            cost = self._batch_ms[key] = self._call_costs.batch_ms(rows, width, self.max_batch)
        return cost

    def _run_in_powers_of_two(self, arrays: dict, rows: int, limit: int) -> list:
        """Rows in calls of powers of two: slices, or one call with the last row copied up to the next power
        where the build's times say that is cheaper (CallCosts.calls); only this batch's rows come back."""
        from miaotui.engines.openvino_shapes import power_of_two_rows

        if self._call_costs is None:  # a sidecar from before the cost table
            return [self._backend.run(chunk) for chunk in row_slices(arrays, power_of_two_rows(rows, limit))]
        width = max((array.shape[1] for array in arrays.values() if len(array.shape) > 1), default=1)
        calls = self._call_costs.calls(rows, width, limit)
        if sum(calls) == rows:
            return [self._backend.run(chunk) for chunk in row_slices(arrays, calls)]
        grown = {name: np.concatenate([array, np.repeat(array[-1:], calls[0] - rows, axis=0)])
                 for name, array in numpy_feed(arrays).items()}
        return [[output[:rows] for output in self._backend.run(grown)]]

    def prepare_one_text(self) -> list[int]:
        """Compile now what the first call at each one-text width would (an engine that runs one text on
        fixed-width models: 0.2 s each for MiniLM): a server's start pays it instead of its first requests.
        Returns the widths one text runs at on a model of its own (none for other engines)."""
        if not self.one_text_fixed:
            return []
        self._backend.compile_fixed_widths()
        return self._backend.fixed_widths

    def __call__(self, **inputs) -> dict:
        return self.run(inputs)

    def run(self, inputs: Mapping[str, object], batch_size: int | None = None) -> dict:
        """Outputs by name. Batches larger than `batch_size` (at most the engine's max; by default the
        rows under the call size its build measured fastest, else the max) are run in slices and joined."""
        feed = to_feed(self.metadata.inputs, inputs)
        if batch_size is not None and batch_size < 1:
            raise InputError(f"batch_size={batch_size}: expected a positive number of rows")
        limit = self.max_batch if self._splittable else feed.batch
        if batch_size is None and self.max_call_elements:
            batch_size = rows_per_call(feed.arrays, self.max_call_elements)
        size = min(batch_size or limit, limit)
        if self._call_costs is not None or self.width_step:  # rows in powers of two: a few shapes, each prepared once
            results = self._run_in_powers_of_two(feed.arrays, feed.batch, size)
        elif feed.batch <= size:
            results = [self._backend.run(feed.arrays)]
        else:
            results = [self._backend.run(chunk) for chunk in row_slices(feed.arrays, size)]
        outputs = {}
        for index, info in enumerate(self.metadata.outputs):
            parts = [result[index] for result in results]
            outputs[info.name] = _deliver(parts, feed.torch_device)
        return outputs


def check_signature(path: Path, metadata: EngineMetadata, runner) -> None:
    """The sidecar's sha256 guards the engine file, not the sidecar: what the loaded engine itself
    reports of its inputs and outputs (names, dtypes, ranks, fixed sizes and, where it knows them,
    dim bounds) must be what the sidecar says, or the runtime's input checks would guard the wrong
    contract. A runner without `signature` is not checked (every backend here has one)."""
    signature = getattr(runner, "signature", None)
    if signature is None:
        return
    inputs, outputs = signature()
    fix = "the sidecar was edited or belongs to another engine: rebuild with 'miaotui build'"

    def refuse(what: str) -> None:
        raise InputError(f"{path}: {what}; {fix}")

    found = {t.name: t for t in inputs}
    if sorted(found) != sorted(t.name for t in metadata.inputs):
        refuse(f"the sidecar names inputs {', '.join(t.name for t in metadata.inputs)}, the engine takes "
               f"{', '.join(found)}")
    for spec in metadata.inputs:
        actual = found[spec.name]
        if actual.dtype != spec.dtype or len(actual.dims) != len(spec.min):
            refuse(f"the sidecar says input '{spec.name}' is {spec.dtype} of rank {len(spec.min)}, the engine takes "
                   f"{actual.dtype} of rank {len(actual.dims)}")
        for axis, (size, low, high) in enumerate(zip(actual.dims, spec.min, spec.max)):
            bound = actual.bounds[axis] if actual.bounds else None
            if (size is not None and not low == high == size) or (bound and not bound[0] <= low <= high <= bound[1]):
                takes = size if size is not None else f"{bound[0]}..{bound[1]}"
                refuse(f"the sidecar says input '{spec.name}' dim {axis} is {low}..{high}, the engine takes {takes}")
    produced = {t.name: t for t in outputs}
    for info in metadata.outputs:
        if info.name not in produced or produced[info.name].dtype != info.dtype:
            got = produced.get(info.name)
            refuse(f"the sidecar says output '{info.name}' is {info.dtype}, the engine gives "
                   f"{got.dtype if got else 'no such output'}")


def _deliver(parts: list, device: str | None):
    """Join the slices' outputs and hand them back in the caller's kind: numpy, or torch on its device."""
    if is_torch(parts[0]):
        import torch

        joined = parts[0] if len(parts) == 1 else torch.cat(parts)
        return joined.cpu().numpy() if device is None else joined.to(device)
    joined = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if device is None:
        return joined
    import torch

    return torch.from_numpy(joined).to(device)
