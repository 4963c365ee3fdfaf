"""Deployable files: a model exported to ONNX or a torch.export program, checked against the model before it is written, optionally quantised to int8 (docs/export.md)."""
