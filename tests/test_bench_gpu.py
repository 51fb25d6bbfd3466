"""bench.gpu runs to the end on a CPU with --tiny (the GPU figures are the bench's to print, where a GPU is)."""

from __future__ import annotations

import math

from bench.gpu import main


def test_the_gpu_bench_runs_both_families_on_the_tiny_models():
    rows = main(["--tiny", "--runs", "1", "--steps", "2"])
    assert [(row["family"], row["size"], row["mode"]) for row in rows] == [("sd15", 64, "cpu"), ("sdxl", 64, "cpu")]
    assert all(row["studio_s"] > 0 and row["diffusers_s"] > 0 and math.isnan(row["studio_peak_gib"]) for row in rows)
