"""A Hugging Face sequence classifier from a local save_pretrained folder, as a module miaotui exports.

transformers is an optional dependency (`pip install miaotui[huggingface]`), imported here only.
Nothing is downloaded (local_files_only) and nothing is unpickled (safetensors weights only).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

from miaotui.errors import InputError, first_line


def _sequence_classifier_class():
    import torch

    class SequenceClassifier(torch.nn.Module):
        """The checkpoint's logits for the inputs the config names; keyword arguments in, one tensor
        out, so the export has plain named inputs and one output."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            given = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                given["token_type_ids"] = token_type_ids
            return self.model(**given, return_dict=True).logits

    return SequenceClassifier


def load_huggingface(folder: Path, where: str):
    """The folder's *ForSequenceClassification model in eval mode, wrapped to return logits."""
    try:
        import transformers
    except ImportError:
        raise InputError(f"{where}: reading a Hugging Face folder needs transformers: "
                         "pip install 'miaotui[huggingface]'") from None
    # Eager attention: plain MatMul/Softmax ops, which every backend parses and the quantizer's rules know.
    captured = io.StringIO()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(captured):
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, attn_implementation="eager")
    except Exception as error:
        raise InputError(f"{where}: transformers could not load {folder}: {first_line(error)}") from error
    return _sequence_classifier_class()(model).eval()
