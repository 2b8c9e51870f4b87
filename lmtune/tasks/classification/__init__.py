"""The classification task."""
