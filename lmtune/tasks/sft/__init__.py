"""The sft task."""
