"""aligner's plugins, one folder per custom op (installed as the package ``aligner_plugins``).

Each folder's ``SPEC`` (:class:`aligner.plugin.PluginSpec`) is the one definition of the op:
ONNX schema, reference implementation, ONNX Runtime custom op and TensorRT plugin derive from it.
"""
