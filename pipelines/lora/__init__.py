"""LoRAs: applying them as adapters (adapters.py), writing a trained adapter as a kohya file (export.py), and
the emoji judge that scores a LoRA's effect (judge.py). Training them is pipelines/training/."""
