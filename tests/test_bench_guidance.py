"""bench.guidance's PAG overhead part on the seeded tiny model: the studio's PAG image is diffusers' PAG pipeline's,
and the shared UNet keeps its own attention processors (the figures themselves are the bench's to print)."""

from __future__ import annotations

from bench.guidance import measure_overhead, parse_args


def test_the_overhead_part_times_the_same_pag_image_on_both_paths(worker):
    result = measure_overhead(parse_args(["--tiny", "--runs", "1", "--steps", "4"]), worker)
    assert result["max_pixel_difference"] == {"PAG": 0, "plain": 0}
    assert set(result["median_ms"]) == {"diffusers", "studio", "diffusers PAG", "studio PAG"}
    assert result["studio_pag_over_diffusers_pag"] > 0 and result["pag_layers"] == "mid"
