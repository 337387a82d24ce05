"""Promptier training: logs -> labels -> fine-tuned, calibrated model -> ONNX artifact -> evaluation.

Modules import torch lazily where they can, so that `promptier serve` does not need the train extra.
"""
