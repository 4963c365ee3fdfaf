"""Everything matplotlib draws: spectra, class heatmaps, the trade-off figure."""
