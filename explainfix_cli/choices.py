"""The allowed values of the library's options, defined once.

Torch-free, so that the command line builds its choices (and answers `--help`) without importing
torch; the library modules take their `Literal` types from here.
"""

from __future__ import annotations

from typing import Literal

Criterion = Literal["gradient", "magnitude"]  # docs/method.md §1
Granularity = Literal["kernel", "channel"]  # §2-3
Removal = Literal["exact", "calibrated", "aggressive"]  # §3, each a superset of the one before
Fill = Literal["zero", "reset", "fillzero"]  # §3, zeroed kernels that stay
AttributionMethod = Literal["saliency", "integrated-gradients"]
FigureFormat = Literal["png", "svg", "pdf"]
LatencyForm = Literal["eager", "deployment"]  # the model as written, or batch norms folded and channels-last (bench)
Init = Literal["keep", "dct2", "ghaar", "random"]  # §4, steered initialisation of fixed filters
Trainable = Literal["auto", "unfixed", "masked", "all"]  # what finetune trains (training.trainable)
BatchNormMode = Literal["train", "frozen"]
OptimizerName = Literal["adam", "adamw", "sgd"]
MemoryFormat = Literal["auto", "channels-last", "contiguous"]  # finetune's layout (training.layout): auto = channels-last on the CPU
ExportFormat = Literal["onnx", "pt2"]  # docs/export.md: onnxruntime's file, or a torch.export program
Quantization = Literal["int8"]  # post-training static quantisation (ONNX, QDQ)
