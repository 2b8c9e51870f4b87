"""Reading, validating and preparing training data."""
