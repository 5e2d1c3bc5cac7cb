"""A work dir's engine -> a Triton Inference Server model repository entry:

    REPO/<name>/config.pbtxt        platform, inputs/outputs (-1 for dynamic dims), max_batch_size from
                                    the engine's shape ranges, dynamic batching, instance groups
    REPO/<name>/labels.txt          class names (the first output's label_filename), when the config has them
    REPO/<name>/engine.json         the engine's sidecar: what it was built with and for
    REPO/<name>/1/model.plan        a TensorRT plan (platform tensorrt_plan), model.xml + model.bin (backend openvino), or
    REPO/<name>/1/model.onnx        the graph the onnxruntime engine was built from (onnxruntime_onnx)

config.pbtxt is written from Triton's own schema (serving/model_config.py) and parsed back before the
entry is moved into place; the whole entry is staged beside it and renamed, so a failure leaves the
repository as it was.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from miaotui.engines.backend import get_backend, triton_backends
from miaotui.engines.call_split import rows_within
from miaotui.engines.metadata import EngineMetadata, read_metadata
from miaotui.errors import CheckFailed, InputError
from miaotui.workdir import WorkDir, sidecar_path


@dataclass(frozen=True)
class TritonOptions:
    name: str | None = None  # the model's name in the repository (default: the config's name)
    version: int = 1
    instances: int = 1  # model instances per device (instance_group count)
    engine_threads: str = "auto"  # a text model's threads per instance (runtime/instances.py)
    max_queue_delay_us: int = 100  # how long the dynamic batcher waits to fill a preferred batch
    preferred_batch_sizes: tuple[int, ...] = ()  # default: default_preferred_batches
    force: bool = False  # replace an entry of the same name

    def __post_init__(self):
        from miaotui.runtime.instances import EXPECTED, instance_threads

        try:
            instance_threads(self.engine_threads, self.instances, cpus=1)
        except ValueError:
            raise InputError(f"--engine-threads {self.engine_threads}: {EXPECTED}") from None


@dataclass
class TritonPackage:
    model_dir: Path
    config_file: Path
    model_file: Path
    platform: str
    max_batch_size: int
    engine: Path
    labels: Path | None
    config_text: str
    differences: list[str]  # how Triton's backend runs it unlike the miaotui runtime (Backend.triton_differences)


def _batch_dim(metadata: EngineMetadata) -> tuple[int, str | None]:
    """(max_batch_size, the batch dim's name): Triton batching needs every input and output to start
    with one shared dynamic dim whose range starts at 1; else 0 (no batching, full shapes)."""
    firsts = {t.dims[0] if t.dims else None for t in metadata.inputs} | {
        t.dims[0] if t.dims else None for t in metadata.outputs}
    if len(firsts) != 1:
        return 0, None
    name = firsts.pop()
    if not isinstance(name, str) or any(t.min[0] != 1 for t in metadata.inputs):
        return 0, None
    return min(t.max[0] for t in metadata.inputs), name




def default_preferred_batches(metadata: EngineMetadata, max_batch: int) -> tuple[int, ...]:
    """The engine's opt and max batch; for an engine whose build found calls faster in row slices
    (`max_call_elements`, engines/call_split.py), the rows one such call takes at the opt shape instead
    of the max batch: Triton's onnxruntime backend runs each batch the batcher forms in one call, so the
    batcher should form the sizes that run fastest per row."""
    opt = metadata.inputs[0].opt
    budget = metadata.session.get("max_call_elements")
    if budget:
        rows = min(max_batch, rows_within(tuple(opt[1:]), budget))
        return tuple(sorted({min(opt[0], rows), rows} - {1}))
    return tuple(sorted({opt[0], max_batch} - {1}))


def _labels(work: WorkDir) -> list[str] | None:
    labels = (work.model_table() or {}).get("labels")
    return [str(label) for label in labels] if labels else None


def model_config(metadata: EngineMetadata, name: str, options: TritonOptions, labels: list[str] | None):
    """The engine's inference.ModelConfig message."""
    from miaotui.serving.model_config import TRITON_TYPES, schema

    pb = schema()
    backend = get_backend(metadata.backend)
    if not (backend.triton_platform or backend.triton_backend):
        raise InputError(f"{metadata.engine_file}: a {metadata.backend} engine; Triton serves "
                         f"{' and '.join(triton_backends())} engines (TensorRT-RTX plans need TensorRT-RTX, which Triton's "
                         "TensorRT backend does not link)")
    max_batch, _ = _batch_dim(metadata)
    skip = 1 if max_batch else 0
    config = pb.ModelConfig(name=name, max_batch_size=max_batch)
    if backend.triton_platform:
        config.platform = backend.triton_platform
    else:
        config.backend = backend.triton_backend
    for tensor in metadata.inputs:
        if tensor.dtype not in TRITON_TYPES:
            raise InputError(f"{metadata.engine_file}: input {tensor.name} is {tensor.dtype}, which Triton has no type for")
        config.input.add(name=tensor.name, data_type=pb.DataType.Value(TRITON_TYPES[tensor.dtype]),
                         dims=[lo if lo == hi else -1 for lo, hi in zip(tensor.min[skip:], tensor.max[skip:])])
    for index, tensor in enumerate(metadata.outputs):
        if tensor.dtype not in TRITON_TYPES:
            raise InputError(f"{metadata.engine_file}: output {tensor.name} is {tensor.dtype}, which Triton has no type for")
        output = config.output.add(name=tensor.name, data_type=pb.DataType.Value(TRITON_TYPES[tensor.dtype]),
                                   dims=[d if isinstance(d, int) else -1 for d in tensor.dims[skip:]])
        if index == 0 and labels and list(output.dims) == [len(labels)]:
            output.label_filename = "labels.txt"  # Triton's classification extension answers with names
    if max_batch:
        sizes = options.preferred_batch_sizes or default_preferred_batches(metadata, max_batch)
        for size in sizes:
            if not 1 <= size <= max_batch:
                raise InputError(f"--preferred-batch {size}: the engine takes batches of 1 to {max_batch}")
        config.dynamic_batching.preferred_batch_size.extend(sizes)
        config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    for key, value in backend.triton_parameters(metadata).items():
        config.parameters[key].string_value = value
    kind = pb.ModelInstanceGroup.Kind.Value("KIND_GPU" if backend.on_gpu(metadata) else "KIND_CPU")
    config.instance_group.add(count=options.instances, kind=kind)
    return config


def _config_of(work: WorkDir):
    """The work dir's resolved config (sample value ranges for the packaged graph's check), if it has one."""
    if not work.has_config():
        return None
    from miaotui.models import resolve_config

    return resolve_config(work.config)


@contextlib.contextmanager
def staged_entry(repository: Path, name: str, force: bool):
    """A staging folder in `repository` that becomes `repository/name` when the block succeeds (an
    entry of that name is replaced only with `force`); on failure nothing of it is left."""
    if repository.exists() and not repository.is_dir():
        raise InputError(f"--triton {repository}: exists and is not a folder")
    entry = repository / name
    if entry.exists() and not force:
        raise InputError(f"{entry}: already in the repository; --force replaces it")
    created = not repository.exists()
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repository))
    try:
        yield staging
        if entry.exists():
            shutil.rmtree(entry)
        staging.rename(entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(repository.iterdir()):
            repository.rmdir()
        raise


def package_triton(path: str | Path, repository: str | Path, options: TritonOptions | None = None,
                   backend: str | None = None, precision: str | None = None) -> TritonPackage:
    """Put the engine at `path` (or the work dir `path`'s best one for Triton) into `repository`."""
    from miaotui.artifacts import sha256_file
    from miaotui.serving.model_config import parse, to_text

    options = options or TritonOptions()
    path, repository = Path(path), Path(repository)
    if path.is_dir():
        from miaotui.engines.choice import choose_engine

        engine = choose_engine(path, backend, precision, purpose="for Triton")
    elif path.is_file():
        engine = path
    else:
        raise InputError(f"{path}: no such work dir or engine file")
    metadata = read_metadata(engine)
    if sha256_file(engine) != metadata.engine_sha256:
        raise InputError(f"{engine}: its sha256 is not the sidecar's: the engine was replaced or damaged; rebuild it")
    work = WorkDir.around(engine)
    name = options.name or engine.name.split(".")[0]
    if not name or "/" in name or name.startswith("."):
        raise InputError(f"--name {name!r}: expected a folder name for the model")
    if options.instances < 1 or options.version < 1:
        raise InputError("--instances and --version: expected positive numbers")
    labels = _labels(work)
    config = model_config(metadata, name, options, labels)
    text = to_text(config)
    if parse(text, f"{name}/config.pbtxt") != config:
        raise CheckFailed(f"{name}/config.pbtxt: Triton's schema reads back a different configuration")
    with staged_entry(repository, name, options.force) as staging:
        version_dir = staging / str(options.version)
        version_dir.mkdir()
        model_file = version_dir / get_backend(metadata.backend).triton_model(engine, metadata, version_dir,
                                                                             _config_of(work))
        (staging / "config.pbtxt").write_text(text, encoding="utf-8")
        if labels and any(o.label_filename for o in config.output):
            (staging / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
        shutil.copyfile(sidecar_path(engine), staging / "engine.json")
    entry = repository / name
    return TritonPackage(entry, entry / "config.pbtxt", entry / str(options.version) / model_file.name,
                         config.platform or config.backend, config.max_batch_size, engine,
                         entry / "labels.txt" if (entry / "labels.txt").exists() else None, text,
                         get_backend(metadata.backend).triton_differences(metadata))
