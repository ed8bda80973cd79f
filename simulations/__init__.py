"""Scenarios, the benchmark runner and reports; ``launch`` runs the Flower app on a private local SuperLink."""
