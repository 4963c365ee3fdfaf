"""Explain: which spatial frequencies each layer relies on (docs/method.md §5), and why it decides.

`spectra` computes ExplainSteer, `attributions` wraps captum, `figures` draws, `report` ties
them into one output folder.
"""

from explainfix_cli.explanation.report import ExplainResult, FigureFile, ReportSource, explain
from explainfix_cli.explanation.spectra import LayerSpectra, explainsteer_spectra, layer_spectra

__all__ = ["ExplainResult", "FigureFile", "LayerSpectra", "ReportSource", "explain", "explainsteer_spectra", "layer_spectra"]
