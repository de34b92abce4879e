"""INT8 quantization: ONNX Runtime's QDQ quantizer as a target (``ort:cpu:int8``, ``emu:int8``).

``quantize`` makes and caches the QDQ model (calibration from ``--calib``), ``match`` reads original
tensors through Q/DQ pairs and builds each node's quantized unit for isolation, ``runner`` is the
Runner of INT8 targets, ``switch`` is one QDQ model whose every Q/DQ pair can be switched off per run
(the pin search's ranking), ``sweep`` picks the quantizer settings with the smallest full-INT8 error.
Everything here imports onnxruntime lazily through the backends; ``import aligner`` does not load it.
"""
