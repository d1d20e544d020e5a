"""Model descriptions every side reads: the architecture config and the one parameter table per model."""
