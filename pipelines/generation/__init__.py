"""Generation for every task: the service the UI and the APIs call (generator.py)."""
