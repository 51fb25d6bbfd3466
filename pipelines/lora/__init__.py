"""LoRAs: applying them as adapters (adapters.py) and training them: the request and its events
(train_request.py), the data (train_data.py), the loop (training.py), checkpoints and resuming
(checkpoint.py), the kohya file (export.py), and the emoji judge that scores a LoRA's effect (judge.py)."""
