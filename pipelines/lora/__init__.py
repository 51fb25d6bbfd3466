"""LoRAs: applying them as adapters (adapters.py) and training them (training.py)."""
