"""Running an ONNX-format artifact: each rank's segments on onnxruntime, its collectives on torch.

Modules: :mod:`.program` (:class:`OnnxRankProgram`, a rank program walking the manifest's steps) and
:mod:`.session` (onnxruntime sessions and zero-copy DLPack hand-over).  Invariant: onnxruntime is imported
only when an ONNX-format rank is loaded.
"""
