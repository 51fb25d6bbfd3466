"""The guidance panel's pictures and tables (the runs themselves: guidance.py): the RMS of each method's guidance
direction at every model call, overlaid; the directions at the chosen calls as images, a row per method; this
run's numbers and the held-out figures as Markdown tables.

A direction lives in the latent space (4 channels for SD-style models). It is drawn through the latent previewer's
linear latent -> RGB map (pipelines/core/preview.py), the colours the previews show, without its offset, as the way
it moves the image: an ε-direction d changes x̂_0 by −√(1−ᾱ_t)/√ᾱ_t · d, so −d is drawn; ∇log p(y|x_t) is a direction
of x_t already and is drawn as it is. Each image is scaled to its own largest value, symmetrically, so grey is 0;
the RMS under it says how large it is.

Figures are built with `matplotlib.figure.Figure()` directly, so importing this module selects no backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import font_manager
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from pipelines.core.guidance import in_interval
from pipelines.explorer.guidance import (CLASSIFIER, CLASSIFIER_GRADIENT, COSINE, INTERVAL, GuidanceComparison,
                                         MethodRun, rms)

MIN_CELL_PX = 96              # direction images are enlarged (nearest) to at least this
LINE_STYLES = ("-", "--", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
DIRECTION_LEGEND = ("Colour: the direction through the latent previewer's linear latent→RGB map, as the way it "
                    "moves the image (−d for an ε-direction d, ∇log p as it is); each image scaled to its own largest "
                    "value, grey = 0; its size is the RMS under it.")


@dataclass
class GuidanceView:
    """A guidance comparison as the panel shows it."""
    comparison: GuidanceComparison
    gallery: list[tuple[Image.Image, str]]   # each final image, captioned with its method and the judge's numbers
    figure: Figure                           # norm_plot
    grid: Image.Image | None                 # direction_grid (None: no ticked method adds a direction)
    run_table: str                           # Markdown
    held_out_table: str                      # Markdown
    notes: str                               # Markdown


def guidance_view(comparison: GuidanceComparison) -> GuidanceView:
    notes = [f"Seed {comparison.seed}, the same noise for every method. {DIRECTION_LEGEND}", *comparison.notes]
    return GuidanceView(comparison=comparison,
                        gallery=[(run.final_image, run.caption()) for run in comparison.runs],
                        figure=norm_plot(comparison), grid=direction_grid(comparison),
                        run_table=run_table(comparison), held_out_table=held_out_table(comparison),
                        notes="\n".join(f"- {note}" for note in notes))


# ----------------------------------------------------------------------------- the norm plot


def norm_plot(comparison: GuidanceComparison) -> Figure:
    """RMS of every direction each method adds at each model call (∇log p itself left out: it is not added as
    it is); the guidance interval shaded, the drawn calls dotted."""
    figure = Figure(figsize=(8, 3.8), layout="constrained")
    axes = figure.add_subplot()
    drawn = 0
    for colour, run in enumerate(comparison.runs):
        added = [component for component in run.components if component != CLASSIFIER_GRADIENT]
        for style, component in zip(LINE_STYLES, added):
            label = run.method if len(added) == 1 else f"{run.method}: {component}"
            # a marker per method: where two methods add the same (CFG and CFG + PAG's CFG), both show
            axes.plot(np.arange(len(run.norms[component])), run.norms[component], linestyle=style,
                      marker=MARKERS[colour % len(MARKERS)], markersize=4, markerfacecolor="none",
                      color=f"C{colour}", label=label)
            drawn += 1
        if run.method == INTERVAL:
            inside = [index for index in range(len(run.timesteps))
                      if in_interval(run.request.cfg_start, run.request.cfg_end, index, len(run.timesteps))]
            if inside:
                axes.axvspan(inside[0] - 0.5, inside[-1] + 0.5, color=f"C{colour}", alpha=0.08,
                             label=f"interval [{run.request.cfg_start:g}, {run.request.cfg_end:g})")
    for call in comparison.shown_calls:
        axes.axvline(call, color="0.6", linestyle=":", linewidth=0.8)
    if not drawn:
        axes.text(0.5, 0.5, "No ticked method adds a direction (none: CFG 1, ε_c alone).", ha="center",
                  va="center", transform=axes.transAxes)
    axes.set_xlabel("model call (from noise, t falling; dotted: the calls drawn below)")
    axes.set_ylabel("RMS of the direction")
    axes.set_title(f"What each method adds to ε_c, per model call · seed {comparison.seed}")
    axes.set_ylim(bottom=0)
    if drawn:
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return figure


# ----------------------------------------------------------------------------- the direction images


def direction_image(direction: torch.Tensor, matrix: torch.Tensor, *, moves_image: bool = False) -> Image.Image:
    """One (1, C, h, w) direction as RGB through `matrix` (no offset), grey = 0, scaled symmetrically to its own
    largest value, enlarged (nearest) to at least MIN_CELL_PX. `moves_image`: it is a direction of x_t (∇log p),
    drawn as it is; else an ε-direction, drawn negated (see the module's docstring)."""
    signed = direction.float() if moves_image else -direction.float()
    rgb = torch.einsum("bchw,cr->brhw", signed.cpu(), matrix[:-1].float())[0].permute(1, 2, 0).numpy()
    largest = float(np.abs(rgb).max())
    values = 0.5 + 0.5 * rgb / largest if largest > 0 else np.full_like(rgb, 0.5)
    image = Image.fromarray((np.clip(values, 0, 1) * 255).round().astype(np.uint8), mode="RGB")
    factor = max(1, math.ceil(MIN_CELL_PX / min(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _font(size: int) -> ImageFont.FreeTypeFont:
    # matplotlib's DejaVu Sans has ε, ∇, √ and ᾱ; PIL's default font has none of them
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def direction_grid(comparison: GuidanceComparison) -> Image.Image | None:
    """Rows: the methods that add a direction; columns: the drawn model calls; in each cell the method's directions
    side by side (CFG + classifier: w(ε_c − ε_u), its classifier term and ∇log p), each with its RMS."""
    runs = [run for run in comparison.runs if run.components and run.directions]
    if not runs:
        return None
    matrix = comparison.latent_to_rgb
    font, small = _font(13), _font(11)
    images = {(run.method, call, component): direction_image(direction, matrix,
                                                             moves_image=component == CLASSIFIER_GRADIENT)
              for run in runs for call, directions in run.directions.items()
              for component, direction in directions.items()}
    side = next(iter(images.values())).width
    widest = max(len(run.components) for run in runs)
    gap, line = 6, 15
    label_width = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(run.method, font=font) for run in runs) + 12
    cell_width = widest * (side + gap) + gap
    cell_height = side + 3 * line + gap
    calls = comparison.shown_calls
    grid = Image.new("RGB", (int(label_width) + len(calls) * cell_width, 2 * line + len(runs) * cell_height), "white")
    draw = ImageDraw.Draw(grid)
    first = runs[0]
    for column, call in enumerate(calls):
        left = int(label_width) + column * cell_width + gap
        t = f" · t = {first.timesteps[call]:.0f}" if call < len(first.timesteps) else ""
        draw.text((left, 2), f"call {call}{t}", fill="black", font=font)
    for row, run in enumerate(runs):
        top = 2 * line + row * cell_height
        draw.text((4, top + side // 2 - 7), run.method, fill="black", font=font)
        for column, call in enumerate(calls):
            if call not in run.directions:      # stopped before it
                continue
            for position, component in enumerate(run.components):
                left = int(label_width) + column * cell_width + gap + position * (side + gap)
                grid.paste(images[(run.method, call, component)], (left, top))
                draw.text((left, top + side + 1), _short(component), fill="black", font=small)
                draw.text((left, top + side + 1 + line), f"RMS {rms(run.directions[call][component]):.3g}",
                          fill=(80, 80, 80), font=small)
            if run.method == CLASSIFIER and call < len(run.cosines) and not math.isnan(run.cosines[call]):
                left = int(label_width) + column * cell_width + gap
                draw.text((left, top + side + 1 + 2 * line), f"{COSINE} = {run.cosines[call]:.2f}",
                          fill=(40, 40, 160), font=small)
    return grid


def _short(component: str) -> str:
    return {"−√(1−ᾱ_t)·s·∇log p(y|x_t)": "−√(1−ᾱ)s∇log p"}.get(component, component)


# ----------------------------------------------------------------------------- the tables


def run_table(comparison: GuidanceComparison) -> str:
    """This run's numbers per method, as a Markdown table."""
    lines = [("| method | prompt's class: rank | top-1 | top-5 | judge's top 3 | mean RMS of what it adds | "
              "model evaluations | seconds |"), "|---|---|---|---|---|---|---|---|"]
    for run in comparison.runs:
        judge = run.judge
        rank = "—" if judge is None or judge.rank is None else str(judge.rank)
        top1 = "—" if judge is None or judge.rank is None else ("✓" if judge.rank == 1 else "✗")
        top5 = "—" if judge is None or judge.rank is None else ("✓" if judge.rank <= 5 else "✗")
        guesses = "—" if judge is None else ", ".join(f"{name} {p:.2f}" for name, p in judge.top3)
        added = _mean_added(run)
        lines.append(f"| {run.method} | {rank} | {top1} | {top5} | {guesses} | {added} | {run.model_evaluations} | "
                     f"{run.seconds:.2f} |")
    return "\n".join(lines)


def _mean_added(run: MethodRun) -> str:
    parts = [f"{component}: {np.mean(run.norms[component]):.3g}" for component in run.components
             if component != CLASSIFIER_GRADIENT and run.norms[component]]
    return "; ".join(parts) or "0 (ε_c alone)"


def held_out_table(comparison: GuidanceComparison) -> str:
    """bench/guidance.py's rows as a Markdown table, with where they come from (or why there are none)."""
    rows = comparison.held_out
    if not rows:
        return comparison.held_out_about
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines) + f"\n\n{comparison.held_out_about}"


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")
