"""Placeholder: filled in by the loss-zoo work (issue 4)."""
