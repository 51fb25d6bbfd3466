"""Device work as jobs on one worker thread (worker.py)."""
