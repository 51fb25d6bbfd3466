"""The Diffusion Explorer: the forward process, the reverse process step by step, speculative sampling's
rounds, and the service the Explorer tab calls (service.py)."""
