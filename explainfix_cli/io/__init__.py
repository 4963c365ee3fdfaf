"""Models in and out, data sources, preprocessing, atomic outputs (the *load* and *write* stages)."""
