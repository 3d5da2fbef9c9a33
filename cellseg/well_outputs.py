"""The batch job's adapter to cellseg/wells.py and cellseg/plate_plots.py: writes wells.csv,
doubling.csv and the wells' plots into a job's output folder from its summary rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from cellseg.summary import csv_table
from cellseg.wells import DOUBLING_FIELDS, WELL_FIELDS, by_well, doubling_rows, well_table


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "plate"


def well_plot_path(out: Path, plate: str, well: str) -> Path:
    return out / "plots" / "wells" / f"{_safe(f'{plate}_{well}' if plate else well)}.png"


def plate_plot_path(out: Path, plate: str) -> Path:
    return out / "plots" / f"plate_{_safe(plate)}.png"


def write_well_outputs(out: Path, rows: Sequence[dict], changed: set[tuple[str, str]],
                       write: Callable[[Path, bytes], None]) -> None:
    """wells.csv and doubling.csv (rebuilt every run: cheap, from the rows), and the plots of the
    wells with a time point segmented in this run (`changed`: (plate, well)) or without a plot yet,
    since drawing takes a moment and a resumed job redraws only what changed. Nothing where no
    image was placed in a well."""
    from cellseg.plate_plots import plate_png, well_png

    table = well_table(rows)
    if not table:
        return
    fits = {(r["plate"], r["well"]): r for r in doubling_rows(table)}
    write(out / "wells.csv", csv_table(table, WELL_FIELDS, ignore_extra=True))
    write(out / "doubling.csv", csv_table(fits.values(), DOUBLING_FIELDS, ignore_extra=True))
    wells = by_well(table)
    for (plate, well), points in wells.items():
        path = well_plot_path(out, plate, well)
        if (plate, well) in changed or not path.is_file():
            write(path, well_png(plate, well, points, fits[(plate, well)]))
    for plate in sorted({plate for plate, _ in wells}):
        path = plate_plot_path(out, plate)
        if any(p == plate for p, _ in changed) or not path.is_file():
            plate_wells = {well: points for (p, well), points in wells.items() if p == plate}
            write(path, plate_png(plate, plate_wells, {w: fits[(plate, w)] for w in plate_wells}))
