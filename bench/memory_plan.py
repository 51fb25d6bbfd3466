"""What `auto` picks for each family at its native size on a 24 GB and an 80 GB card, and the largest request the
budget then allows: the studio's own estimates (pipelines/models/memory.py: `choose_mode`, `largest_megapixels`)
fed with each family's real component sizes in bf16/fp16 (2 bytes a parameter; the published parameter counts,
rounded). No GPU is needed: this is the plan the studio makes before it places anything.

    python -m bench.memory_plan
    python -m bench.memory_plan --vram 12 --vram 16

Model offload (`balanced`, `low`) keeps the largest component on the card at once: the UNet or the transformer,
or, for SD 3 medium, the T5 text encoder.
"""

from __future__ import annotations

import argparse

import torch

from pipelines.models.memory import GIB, choose_mode, largest_megapixels

# family -> (native side, {component: parameters in millions})
FAMILIES = {
    "SD 1.5": (512, {"unet": 860, "text_encoder (CLIP-L)": 123, "vae": 84}),
    "SDXL": (1024, {"unet": 2567, "text_encoder (CLIP-L)": 123, "text_encoder_2 (OpenCLIP-G)": 695, "vae": 84}),
    "SD 3 medium": (1024, {"transformer (MMDiT)": 2028, "CLIP-L": 124, "CLIP-G": 695, "T5-XXL": 4762, "vae": 84}),
    "SD 3.5 large": (1024, {"transformer (MMDiT)": 8056, "CLIP-L": 124, "CLIP-G": 695, "T5-XXL": 4762, "vae": 84}),
    "Flux.1 dev": (1024, {"transformer": 11901, "CLIP-L": 123, "T5-XXL": 4762, "vae": 84}),
    "Flux 2 klein 4B": (1024, {"transformer": 3900, "Qwen3-4B": 4022, "vae": 84}),
    "Flux 2 dev": (1024, {"transformer": 32000, "Mistral Small 3.1": 24000, "vae": 84}),
}
BYTES_PER_PARAMETER = 2


def plan(vram_gib: float) -> list[dict]:
    cuda, rows = torch.device("cuda"), []
    for family, (side, parts) in FAMILIES.items():
        weights = sum(parts.values()) * 1e6 * BYTES_PER_PARAMETER
        largest = max(parts.values()) * 1e6 * BYTES_PER_PARAMETER
        free = int(vram_gib * GIB)
        mode = choose_mode(device=cuda, requested="auto", weights_bytes=int(weights), free_vram_bytes=free,
                           width=side, height=side, offload_bytes=int(largest))
        room = largest_megapixels(mode=mode, weights_bytes=int(weights), free_bytes=free, offload_bytes=int(largest))
        rows.append({"family": family, "vram_gib": vram_gib, "weights_gib": weights / GIB,
                     "largest": max(parts, key=parts.get), "largest_gib": largest / GIB, "side": side,
                     "mode": mode.value, "largest_request_mp": room})
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vram", type=float, action="append", help="free VRAM in GiB (default: 24 and 80)")
    args = parser.parse_args(argv)
    rows = [row for vram in args.vram or [24, 80] for row in plan(vram)]
    print(f"{'family':<16} {'VRAM':>5} {'weights':>8} {'largest component':<28} {'native':>7} {'auto picks':<11} "
          f"{'largest request':>16}")
    for row in rows:
        largest = f"{row['largest']} {row['largest_gib']:.1f}G"
        print(f"{row['family']:<16} {row['vram_gib']:>4.0f}G {row['weights_gib']:7.1f}G {largest:<28} "
              f"{row['side']:>6}² {row['mode']:<11} {row['largest_request_mp']:12.1f} MP")
    return rows


if __name__ == "__main__":
    main()
