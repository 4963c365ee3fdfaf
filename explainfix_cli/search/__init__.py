"""The pct sweep and the search for a pct that meets a target (docs/method.md §2-3)."""
