"""Class-specific filters (docs/method.md §6): analysis, extraction, class gates."""
