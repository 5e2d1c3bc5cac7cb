"""Triton Python-backend models for the two ends of the ensemble (serving/ensemble.py):

    step "tokenize": text (STRING) -> input_ids, attention_mask[, token_type_ids] (INT64, padded per request)
    step "labels":   logits (FP32)  -> label (STRING), score (FP32)

Copied into a repository as `<name>-tokenize/1/model.py` and `<name>-labels/1/model.py`; the config's
`step` parameter says which. They need only numpy and tokenizers (the engine between them is run by
Triton's own TensorRT or onnxruntime backend), so the ensemble is the GPU server's form.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.step = parameters["step"]
        here = Path(__file__).resolve().parent
        if self.step == "tokenize":
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(here / "tokenizer.json"))
            padding = self.tokenizer.padding or {}
            self.tokenizer.enable_padding(pad_id=int(parameters["pad_id"]), pad_token=padding.get("pad_token", "[PAD]"))
            self.tokenizer.enable_truncation(max_length=int(parameters["max_length"]))
            self.min_length = int(parameters["min_length"])
            self.outputs = [o["name"] for o in config["output"]]
        else:
            self.labels = (here / "labels.txt").read_text(encoding="utf-8").split("\n")[:-1]

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        try:
            if self.step == "tokenize":
                return pb_utils.InferenceResponse(output_tensors=self._tokenize(request))
            return pb_utils.InferenceResponse(output_tensors=self._labels(request))
        except ValueError as error:
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(error)))

    def _tokenize(self, request):
        values = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
        texts = []
        for position, value in enumerate(values):
            try:
                text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            except UnicodeDecodeError:
                raise ValueError(f"text[{position}]: not UTF-8") from None
            if not text.strip():
                raise ValueError(f"text[{position}] is empty: there is nothing to classify")
            texts.append(text)
        encodings = self.tokenizer.encode_batch(texts)
        fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        tensors = []
        for name in self.outputs:
            array = np.array([getattr(e, fields[name]) for e in encodings], dtype=np.int64)
            if array.shape[1] < self.min_length:  # the engine's profile starts at the seq dim's min
                pad = int(self.tokenizer.padding["pad_id"]) if name == "input_ids" else 0
                array = np.pad(array, ((0, 0), (0, self.min_length - array.shape[1])), constant_values=pad)
            tensors.append(pb_utils.Tensor(name, array))
        return tensors

    def _labels(self, request):
        logits = pb_utils.get_input_tensor_by_name(request, "logits").as_numpy().astype(np.float64)
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
        best = probabilities.argmax(axis=-1)
        labels = np.array([[self.labels[i].encode("utf-8")] for i in best], dtype=np.object_)
        scores = probabilities[np.arange(len(best)), best].astype(np.float32).reshape(-1, 1)
        return [pb_utils.Tensor("label", labels), pb_utils.Tensor("score", scores)]
