"""Pretrained models: the bundled offline ones, local folders, and the checks they pass before loading."""
