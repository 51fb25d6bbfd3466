"""bench.gpu runs to the end on a CPU with --tiny (its GPU figures are its own to print, where a GPU is), and
bench.memory_plan plans each family's memory mode from its real component sizes."""

from __future__ import annotations

import math

from bench.gpu import main


def test_the_gpu_bench_runs_every_family_on_the_tiny_models():
    rows = main(["--tiny", "--runs", "1", "--steps", "2"])
    assert [(row["family"], row["size"], row["mode"]) for row in rows] == [("sd15", 64, "cpu"), ("sdxl", 64, "cpu"),
                                                                           ("flux", 64, "cpu")]
    assert all(row["studio_s"] > 0 and row["diffusers_s"] > 0 and math.isnan(row["studio_peak_gib"]) for row in rows)


def test_the_memory_plan_offloads_flux_on_24_gb_and_keeps_it_whole_on_80():
    from bench.memory_plan import main as plan

    rows = {(row["family"], row["vram_gib"]): row for row in plan(["--vram", "24", "--vram", "80"])}
    flux_24, flux_80 = rows[("Flux.1 dev", 24)], rows[("Flux.1 dev", 80)]
    assert flux_24["weights_gib"] > 24 and flux_24["mode"] in ("balanced", "low", "sequential")
    assert flux_24["largest"] == "transformer" and flux_80["mode"] == "high"
    assert rows[("SD 3 medium", 24)]["largest"] == "T5-XXL"       # offload keeps SD 3's text encoder, not its MMDiT
