"""Evaluation: classification metrics, cheap baselines, plots and the Markdown report."""
