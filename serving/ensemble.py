"""The GPU form of "text in, label out": a Triton ensemble around the engine-level entry.

    REPO/<name>-tokenize/   Python backend: text -> the engine's token inputs (tokenizers only)
    REPO/<name>/            the engine-level entry (serving/triton.py): Triton's TensorRT or onnxruntime backend
    REPO/<name>-labels/     Python backend: logits -> label, score
    REPO/<name>-ensemble/   platform "ensemble": text -> tokenize -> engine -> labels

The engine runs in Triton's own backend (on the GPU, for a plan), so a GPU server needs no miaotui
runtime: only numpy and tokenizers in its Python backend. The text model (serving/text_model.py)
is the CPU form. Each request is tokenized on its own (padded to its own length): Triton's batcher
then batches engine requests of equal length only, where the text model sorts a gathered batch by
length itself.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from miaotui.data.tokenizers import ENCODED
from miaotui.engines.metadata import EngineMetadata, read_metadata
from miaotui.errors import CheckFailed, InputError
from miaotui.serving.triton import TritonOptions, TritonPackage, staged_entry

STEPS_MODEL = Path(__file__).with_name("python_steps.py")


@dataclass
class Ensemble:
    name: str
    models: list[Path]  # the tokenize, labels and ensemble entries
    config_text: str  # the ensemble's config.pbtxt


def ensemble_unavailable(metadata: EngineMetadata, max_batch: int, tokenizer: Path | None) -> str | None:
    names = [t.name for t in metadata.inputs]
    if tokenizer is None:
        return "its config names no tokenizer"
    if "input_ids" not in names or not set(names) <= set(ENCODED):
        return f"the engine takes {', '.join(names)}, not token ids"
    if any(t.dtype != "int64" for t in metadata.inputs):
        return "the engine's token inputs are not int64"
    if not max_batch:
        return "the engine has no shared batch dim"
    if not any(isinstance(t.dims[-1], int) for t in metadata.outputs[:1]):
        return "the engine's first output has no fixed class dim"
    return None


def _python_config(pb, name: str, max_batch: int, parameters: dict[str, str]):
    config = pb.ModelConfig(name=name, backend="python", max_batch_size=max_batch)
    config.instance_group.add(count=1, kind=pb.ModelInstanceGroup.KIND_CPU)
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def package_ensemble(engine_entry: TritonPackage, tokenizer: Path, labels: list[str] | None,
                     repository: Path, options: TritonOptions) -> Ensemble:
    """The tokenize, labels and ensemble entries beside `engine_entry` (already in `repository`)."""
    from miaotui.serving.model_config import parse, schema, to_text

    pb = schema()
    metadata = read_metadata(engine_entry.engine)
    max_batch = engine_entry.max_batch_size
    reason = ensemble_unavailable(metadata, max_batch, tokenizer)
    if reason:
        raise InputError(f"{engine_entry.engine}: no ensemble: {reason}")
    name = engine_entry.model_dir.name
    ids = metadata.input("input_ids")
    pad_id = _pad_id(tokenizer)
    output = metadata.outputs[0]
    classes = output.dims[-1]
    labels = labels or [str(i) for i in range(classes)]

    tokenize = _python_config(pb, f"{name}-tokenize", max_batch, {
        "step": "tokenize", "max_length": str(ids.max[1]), "min_length": str(ids.min[1]), "pad_id": str(pad_id)})
    tokenize.input.add(name="text", data_type=pb.TYPE_STRING, dims=[1])
    for tensor in metadata.inputs:
        tokenize.output.add(name=tensor.name, data_type=pb.TYPE_INT64, dims=[-1])
    finish = _python_config(pb, f"{name}-labels", max_batch, {"step": "labels"})
    finish.input.add(name="logits", data_type=pb.TYPE_FP32, dims=[classes])
    finish.output.add(name="label", data_type=pb.TYPE_STRING, dims=[1])
    finish.output.add(name="score", data_type=pb.TYPE_FP32, dims=[1])

    ensemble = pb.ModelConfig(name=f"{name}-ensemble", platform="ensemble", max_batch_size=max_batch)
    ensemble.input.add(name="text", data_type=pb.TYPE_STRING, dims=[1])
    ensemble.output.add(name="label", data_type=pb.TYPE_STRING, dims=[1])
    ensemble.output.add(name="score", data_type=pb.TYPE_FP32, dims=[1])
    ensemble.output.add(name="logits", data_type=pb.TYPE_FP32, dims=[classes])
    steps = ensemble.ensemble_scheduling
    first = steps.step.add(model_name=tokenize.name, model_version=-1)
    first.input_map["text"] = "text"
    engine = steps.step.add(model_name=name, model_version=-1)
    for tensor in metadata.inputs:
        first.output_map[tensor.name] = tensor.name
        engine.input_map[tensor.name] = tensor.name
    engine.output_map[output.name] = "logits"
    last = steps.step.add(model_name=finish.name, model_version=-1)
    last.input_map["logits"] = "logits"
    last.output_map["label"] = "label"
    last.output_map["score"] = "score"

    written = []
    for config, files in ((tokenize, {"tokenizer.json": tokenizer}), (finish, {}), (ensemble, None)):
        text = to_text(config)
        if parse(text, f"{config.name}/config.pbtxt") != config:
            raise CheckFailed(f"{config.name}/config.pbtxt: Triton's schema reads back a different configuration")
        with staged_entry(repository, config.name, options.force) as staging:
            version = staging / str(options.version)
            version.mkdir()
            (staging / "config.pbtxt").write_text(text, encoding="utf-8")
            if files is not None:
                shutil.copyfile(STEPS_MODEL, version / "model.py")
                for target, source in files.items():
                    shutil.copyfile(source, version / target)
                if config is finish:
                    (version / "labels.txt").write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
        written.append(repository / config.name)
    return Ensemble(ensemble.name, written, to_text(ensemble))


def _pad_id(tokenizer: Path) -> int:
    """The id configure() pads with (the tokenizer's own padding token), as Classifier pads."""
    from miaotui.data.tokenizers import configure, load_tokenizer, padding_id

    return padding_id(configure(load_tokenizer(tokenizer), 8))
