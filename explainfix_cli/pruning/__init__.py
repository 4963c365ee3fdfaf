"""Spatial pruning (docs/method.md §2) and channel removal (§3): zeroing, removal, surgery, shuffles, the torch-pruning adapter, the prune pipeline."""
