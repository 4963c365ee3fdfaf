"""Data sources by kind: tensors in a file, image folders per class, image lists, images with masks."""
