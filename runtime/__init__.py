"""The runtime: Engine.load() for any engine miaotui builds, and Classifier for text in, labels out.

Imports nothing from export/; an onnxruntime engine needs neither torch nor onnx.
"""

from miaotui.runtime.classifier import Classifier, Prediction
from miaotui.runtime.engine import Engine

__all__ = ["Classifier", "Engine", "Prediction"]
