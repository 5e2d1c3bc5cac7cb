"""A text-level Triton model: `text` in, `label`, `score` and `logits` out, run by miaotui.runtime in
Triton's Python backend. Self-contained (the repository can move to another machine):

    REPO/<name>-text/config.pbtxt             backend "python", dynamic batching, TYPE_STRING text
    REPO/<name>-text/1/model.py               the TritonPythonModel (serving/python_model.py, copied)
    REPO/<name>-text/1/work/config.toml       tokenizer, labels and output name, as Classifier.load reads them
    REPO/<name>-text/1/work/tokenizer.json
    REPO/<name>-text/1/work/engines/<engine>  the engine and its sidecar

The engine-level entry (serving/triton.py) is the GPU form: Triton runs the plan itself, the client
tokenizes. This one does what a service needs from text, and batches what the dynamic batcher hands
it by length (Classifier.predict), not padded as one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from miaotui.data.tokenizers import ENCODED
from miaotui.engines.metadata import read_metadata
from miaotui.errors import CheckFailed, InputError
from miaotui.serving.triton import TritonOptions, staged_entry
from miaotui.workdir import WorkDir, sidecar_path

TEXT_SUFFIX = "-text"
PYTHON_MODEL = Path(__file__).with_name("python_model.py")
MAX_TEXT_CHARS = 10_000  # a request's text longer than this is refused (the tokenizer truncates long before)


@dataclass
class TextModel:
    name: str
    model_dir: Path
    engine: Path  # the engine it was made from
    max_batch_size: int
    labels: list[str]
    config_text: str


def text_model_config(name: str, max_batch: int, classes: int, options: TritonOptions, max_chars: int):
    from miaotui.serving.model_config import schema

    pb = schema()
    config = pb.ModelConfig(name=name, backend="python", max_batch_size=max_batch)
    config.input.add(name="text", data_type=pb.TYPE_STRING, dims=[1])
    config.output.add(name="label", data_type=pb.TYPE_STRING, dims=[1])
    config.output.add(name="score", data_type=pb.TYPE_FP32, dims=[1])
    config.output.add(name="logits", data_type=pb.TYPE_FP32, dims=[classes])
    sizes = options.preferred_batch_sizes or tuple(s for s in (8, 32) if s <= max_batch)
    for size in sizes:
        if not 1 <= size <= max_batch:
            raise InputError(f"--preferred-batch {size}: the engine takes batches of 1 to {max_batch}")
    config.dynamic_batching.preferred_batch_size.extend(sizes)
    config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    config.instance_group.add(count=options.instances, kind=pb.ModelInstanceGroup.KIND_CPU)
    config.parameters["max_text_chars"].string_value = str(max_chars)
    # threads per instance, worked out where the server runs (runtime/instances.py)
    config.parameters["engine_threads"].string_value = options.engine_threads
    return config


def package_text_model(path: str | Path, repository: str | Path, options: TritonOptions | None = None,
                       backend: str | None = None, precision: str | None = None,
                       max_chars: int = MAX_TEXT_CHARS) -> TextModel:
    """The work dir's best CPU engine for this machine (or `backend`/`precision`'s) as `<name>-text`."""
    from miaotui.artifacts import sha256_file
    from miaotui.engines.backend import get_backend
    from miaotui.engines.choice import choose_engine
    from miaotui.serving.model_config import parse, to_text

    options = options or TritonOptions()
    path, repository = Path(path), Path(repository)
    if not path.is_dir():
        raise InputError(f"{path}: expected a work dir (the text model needs its config.toml and tokenizer)")
    engine = choose_engine(path, backend, precision)
    metadata = read_metadata(engine)
    if sha256_file(engine) != metadata.engine_sha256:
        raise InputError(f"{engine}: its sha256 is not the sidecar's: the engine was replaced or damaged; rebuild it")
    work = WorkDir(path)
    model = _model_table(work)
    tokenizer, labels = tokenizer_and_labels(work.root, model)
    names = [t.name for t in metadata.inputs]
    if "input_ids" not in names or not set(names) <= set(ENCODED):
        raise InputError(f"{engine}: the engine takes {', '.join(names)}; a text model feeds token ids from texts")
    classes = next((t.dims[-1] for t in metadata.outputs if isinstance(t.dims[-1], int)), None)
    if classes is None:
        raise InputError(f"{engine}: no output with a fixed class dim; a text model answers with labels")
    labels = labels or [str(index) for index in range(classes)]
    max_batch = max(1, metadata.inputs[0].max[0])
    name = (options.name or engine.name.split(".")[0]) + TEXT_SUFFIX
    config = text_model_config(name, max_batch, classes, options, max_chars)
    text = to_text(config)
    if parse(text, f"{name}/config.pbtxt") != config:
        raise CheckFailed(f"{name}/config.pbtxt: Triton's schema reads back a different configuration")

    with staged_entry(repository, name, options.force) as staging:
        version = staging / str(options.version)
        inside = WorkDir(version / "work")
        inside.engines_dir.mkdir(parents=True)
        shutil.copyfile(PYTHON_MODEL, version / "model.py")
        shutil.copyfile(engine, inside.engines_dir / engine.name)
        for companion in get_backend(metadata.backend).engine_files(engine):  # an OpenVINO IR's weights
            shutil.copyfile(companion, inside.engines_dir / companion.name)
        shutil.copyfile(sidecar_path(engine), sidecar_path(inside.engines_dir / engine.name))
        shutil.copyfile(tokenizer, inside.root / "tokenizer.json")
        import tomli_w

        inside.config.write_text(tomli_w.dumps({"name": name, "model": {
            "tokenizer": "tokenizer.json", "labels": labels, "outputs": model.get("outputs") or ["logits"]}}))
        (staging / "config.pbtxt").write_text(text, encoding="utf-8")
    entry = repository / name
    return TextModel(name, entry, engine, max_batch, labels, text)


def text_model_unavailable(path: str | Path) -> str | None:
    """Why the work dir at `path` has no text model (no tokenizer, inputs that are not token ids), or None."""
    work = WorkDir(path)
    try:
        model = _model_table(work)
    except InputError as error:
        return str(error)
    if not model.get("tokenizer"):
        return "its config names no tokenizer (model.tokenizer)"
    return None


def tokenizer_and_labels(path: str | Path, model: dict | None = None) -> tuple[Path, list[str] | None]:
    """The work dir's tokenizer.json and class names, as its config.toml names them (`model`: its
    [model] table, when already read)."""
    work = WorkDir(path)
    model = _model_table(work) if model is None else model
    tokenizer = work.root / str(model.get("tokenizer") or "")
    if not model.get("tokenizer") or not tokenizer.is_file():
        raise InputError(f"{work.config}: model.tokenizer: a text model needs the tokenizer.json the config names")
    labels = model.get("labels")
    return tokenizer, [str(label) for label in labels] if labels else None


def _model_table(work: WorkDir) -> dict:
    model = work.model_table()
    if model is None:
        raise InputError(f"{work.config}: missing; a text model reads the tokenizer and labels from the work dir's config")
    return model
