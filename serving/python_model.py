"""Triton Python-backend model: texts in, labels out, through miaotui.runtime.Classifier.

Copied into a model repository as `<name>-text/1/model.py` by `miaotui package` (serving/text_model.py);
it reads the engine, tokenizer and labels from the `work/` folder beside it. Each execute() gets
the requests the dynamic batcher gathered: their texts are classified in one predict() call, which
cuts them into batches of similar length. A bad request (not UTF-8, empty, too long) gets an error
response of its own; the others in the same execute() are answered.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from miaotui.runtime import Classifier
        from miaotui.engines.onnxruntime_backend import stop_spinning_after_calls
        from miaotui.runtime.instances import instance_threads
        from miaotui.serving.server import ENGINE_LOG_PREFIX

        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.max_chars = int(parameters.get("max_text_chars", "10000"))
        # Each instance is a process of its own: they share the CPUs rather than each sizing its pool for all.
        instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
        threads = instance_threads(parameters.get("engine_threads", "auto"), instances)
        # Other engine processes share these CPUs (instances, other models): threads that spin on after a
        # call would take the cores their calls need (engines/onnxruntime_backend.py).
        stop_spinning_after_calls()
        self.classifier = Classifier.load(Path(__file__).resolve().parent / "work", threads=threads)  # its one engine
        engine = self.classifier.engine
        widths = engine.prepare_one_text()  # before the server says ready, not on the first requests
        shapes = f", one text at widths {', '.join(map(str, widths))} (a model each)" if widths else ""
        pool = f"{threads} thread{'s' if threads > 1 else ''}" if threads else "the engine's default threads"
        pb_utils.Logger.log_info(f"{ENGINE_LOG_PREFIX}{config['name']}: {engine.path.name} on {engine.provider}, "
                                 f"{pool}{', parked between calls' if engine.spinning_stopped else ''}{shapes}")

    def _texts(self, request) -> list[str]:
        tensor = pb_utils.get_input_tensor_by_name(request, "text")
        values = tensor.as_numpy().reshape(-1)
        texts = []
        for position, value in enumerate(values):
            try:
                text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            except UnicodeDecodeError as error:
                raise ValueError(f"text[{position}]: not UTF-8 at byte {error.start}") from None
            if not text.strip():
                raise ValueError(f"text[{position}] is empty: there is nothing to classify")
            if len(text) > self.max_chars:
                raise ValueError(f"text[{position}] has {len(text)} characters; this model takes at most "
                                 f"{self.max_chars} (parameter max_text_chars)")
            texts.append(text)
        return texts

    def execute(self, requests):
        gathered, errors = [], {}
        for index, request in enumerate(requests):
            try:
                gathered.append((index, self._texts(request)))
            except ValueError as error:
                errors[index] = str(error)
        texts = [text for _, batch in gathered for text in batch]
        answers = {}
        if texts:
            try:
                predictions, logits = self.classifier.predict_with_logits(texts)
            except Exception as error:  # an InputError names the text; anything else must not kill the server
                for index, _ in gathered:
                    errors[index] = str(error).splitlines()[0] if str(error) else type(error).__name__
                gathered = []
            start = 0
            for index, batch in gathered:
                rows = slice(start, start + len(batch))
                start += len(batch)
                answers[index] = (predictions[rows], logits[rows])
        responses = []
        for index in range(len(requests)):
            if index in errors:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(errors[index])))
                continue
            predicted, rows = answers[index]
            labels = np.array([[p.label.encode("utf-8")] for p in predicted], dtype=np.object_)
            scores = np.array([[p.score] for p in predicted], dtype=np.float32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("label", labels), pb_utils.Tensor("score", scores),
                pb_utils.Tensor("logits", np.asarray(rows, dtype=np.float32))]))
        return responses
