"""The token_classification task."""
