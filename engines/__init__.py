"""Engine builders (TensorRT plan, TensorRT-RTX plan, ONNX Runtime): not built yet."""
