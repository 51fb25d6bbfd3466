"""Which LoRAs are on, and one LoRA merged into the weights while it is the only one (on a CPU).

peft runs an unmerged LoRA as two extra matrix products per patched layer, at every step. At the
sizes a CPU generates (the embedded model at 64 px, batch 1) that costs more than the layer itself:
the shipped LCM-LoRA's 129 layers took a step from 25 to 65 ms here. So while a request's LoRAs
are exactly one LoRA, its weight ΔW is added into the patched layers (peft's `merge`), after the
original weights are kept aside; any other request puts those originals back first, so a request
without LoRAs is the plain model bit for bit (an unmerge by subtraction would not be). The merged
weights are kept too, so switching between that LoRA and none (a Live user beside a plain one) swaps
tensors instead of merging again. Merging is done on a CPU, for patched weights of at most half of
`MERGE_LIMIT_BYTES` (the copy kept costs as much again), and never while a training holds the model
(its steps need the adapters as they are). On a GPU an unmerged LoRA costs little, and the weights are
left alone.
"""

from __future__ import annotations

import torch

from pipelines.core.transformers import denoiser_of

MERGE_LIMIT_BYTES = 512 * 2 ** 20
_ACTIVE = "_studio_active"     # on the UNet: (what is on, whether it is merged into the weights now)
_MERGED = "_studio_merged"     # on the UNet: (the LoRA merged last, [(layer, original weight, merged weight), ...])


def activate(pipeline, adapters: list[str], weights: list[float], *, key: tuple, may_merge: bool) -> None:
    """Make `adapters` (at `weights`) the pipeline's active LoRAs, or none. `key` names what is asked for (the
    adapters, weights and files): asked again, nothing needs doing."""
    unet = denoiser_of(pipeline)
    active = getattr(unet, _ACTIVE, None)
    if active is not None and active[0] == key and may_merge:
        return
    unmerge(pipeline)
    if adapters:
        pipeline.enable_lora()
        pipeline.set_adapters(adapters, adapter_weights=weights)
    elif getattr(unet, "peft_config", None):   # any adapter: a loaded LoRA, or one in training
        pipeline.disable_lora()
    if may_merge:     # remembered (and merged) only while nothing else switches adapters: no training holds it
        setattr(unet, _ACTIVE, (key, len(adapters) == 1 and _merge(unet, adapters[0], key)))


def unmerge(pipeline) -> None:
    """Put back the weights a merge changed (exactly: the originals, not a subtraction), and forget what is on."""
    unet = denoiser_of(pipeline)
    active = getattr(unet, _ACTIVE, None)
    if active is None:
        return
    if active[1]:
        for layer, original, _ in getattr(unet, _MERGED)[1]:
            layer.get_base_layer().weight.data = original
            layer.merged_adapters.clear()
    delattr(unet, _ACTIVE)


def _merge(unet, adapter: str, key: tuple) -> bool:
    """Merge `adapter` into the UNet's layers it patches, if they are on the CPU and small enough. The merged
    weights are kept beside the originals, so the same LoRA asked for again (after a request without it) is
    swapped in, not merged again."""
    kept = getattr(unet, _MERGED, None)
    if kept is None or kept[0] != key:
        if hasattr(unet, _MERGED):
            delattr(unet, _MERGED)
        layers = [module for module in unet.modules() if adapter in getattr(module, "lora_A", {})]
        weights = [layer.get_base_layer().weight for layer in layers]
        if any(weight.device.type != "cpu" for weight in weights) or \
                2 * sum(weight.numel() * weight.element_size() for weight in weights) > MERGE_LIMIT_BYTES or \
                any(getattr(layer, "lora_bias", {}).get(adapter) for layer in layers):   # it would change biases too
            return False
        pairs = []
        try:
            with torch.no_grad():
                for layer, weight in zip(layers, weights):
                    original = weight.data.clone()
                    pairs.append((layer, original, None))
                    layer.merge(adapter_names=[adapter])
                    pairs[-1] = (layer, original, layer.get_base_layer().weight.data)
        except Exception:     # a layer peft cannot merge: every layer back as it was, and the LoRA runs unmerged
            for layer, original, _ in pairs:
                layer.get_base_layer().weight.data = original
                layer.merged_adapters.clear()
            return False
        setattr(unet, _MERGED, (key, pairs))
        return True
    for layer, _, merged in kept[1]:
        layer.get_base_layer().weight.data = merged
        layer.merged_adapters[:] = [adapter]
    return True
