"""The Diffusion Explorer: the forward process (forward.py; its figures in plots.py), the reverse process recorded
step by step and branched (reverse.py, trace.py), samplers compared on one seed (comparison.py), guidance methods
compared on one seed (guidance.py; drawn by guidance_view.py), speculative sampling's rounds (speculative_view.py),
animations (animation.py), the formulas the tab shows (formulas.py), and the service the Explorer tab calls
(service.py)."""
