"""Fixed filters and steered initialisation (docs/method.md §4), narrowing, losses, fine-tuning."""
