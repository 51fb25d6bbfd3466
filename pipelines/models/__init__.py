"""Models: the manager and its slots, where models come from (one path and pickle policy), memory, and the
ControlNet and draft files."""
