"""ONNX artifacts: rank programs cut at their collectives into segments for stock onnxruntime (see
``tpcompile.onnx.artifact``)."""
