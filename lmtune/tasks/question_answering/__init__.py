"""The question_answering task."""
