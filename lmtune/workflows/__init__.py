"""The verbs: train, use a run (predict / eval / chat), plan, inspect, export, report and card.

The only layer that composes tasks, data, models and the training loop.
"""
