"""napari sample data (npe2 contributions in napari.yaml): real phase-contrast images to try cellseg on.

- `livecell_image`: the LIVECell demo image (A172 cells, 704x520) from the data root
  (`cellseg.data.default_data_root`: $CELLSEG_DATA, else ../shared/data beside the repository); where
  that is absent, the 256x256 crop of an A172 training image that ships inside the package.
- `timelapse`: the first frames of the Usiigaci T98G time-lapse under the data root, as a (T, Y, X)
  layer in µm (0.87 µm/px; 10.2 min between frames, in the metadata: the time axis stays in frames).
Pixels keep the files' own type (8-bit, 16-bit): napari's contrast limits then show the real values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cellseg.data import DATA_ENV, default_data_root
from cellseg.imageio import decode_image, to_grayscale
from cellseg.precision import REFERENCE_DIR

LayerData = tuple[Any, dict, str]

LIVECELL_DEMO = Path("demo") / "A172_Phase_A7_1_00d00h00m_1.tif"
LIVECELL_CROP = REFERENCE_DIR / "livecell-A172.png"  # ships in the package (scripts/make_reference_images.py)
LIVECELL_LICENCE = ("CC BY-NC 4.0 (LIVECell, Sartorius; Edlund et al., Nature Methods 2021): non-commercial use, "
                    "attribute LIVECell")

TIMELAPSE = Path("timelapse") / "usiigaci-t98g"
TIMELAPSE_FRAMES = 8  # 80 minutes of 37; 16 MB of 16-bit pixels, quick to open
T98G_UM_PER_PIXEL = 0.87  # the source's own analysis parameters (its README.md)
T98G_MINUTES_PER_FRAME = 10.2
T98G_LICENCE = "MIT (Usiigaci, Okinawa Institute of Science and Technology; Tsai et al., SoftwareX 2019)"


def livecell_image() -> list[LayerData]:
    """The LIVECell A172 demo image from the data root, else the packaged 256x256 crop (the name says which)."""
    full = default_data_root() / LIVECELL_DEMO
    path, name = (full, "A172 (LIVECell)") if full.is_file() else (LIVECELL_CROP, "A172 crop 256x256 (LIVECell)")
    metadata = {"source": str(path), "licence": LIVECELL_LICENCE, "cell_type": "A172"}
    return [(_read_gray(path), {"name": name, "metadata": metadata}, "image")]


def timelapse() -> list[LayerData]:
    """The first TIMELAPSE_FRAMES frames of the T98G time-lapse as (T, Y, X), scaled to µm.
    Raises FileNotFoundError saying where it looked and how to point elsewhere."""
    folder = default_data_root() / TIMELAPSE / "frames"
    frames = sorted(folder.glob("*.tif"))[:TIMELAPSE_FRAMES]  # ...xy01t01.tif: zero-padded, so name order is time
    if not frames:
        raise FileNotFoundError(f"the T98G time-lapse is not in {folder}: set {DATA_ENV} to the folder holding "
                                f"{TIMELAPSE.as_posix()}/ (the project's shared data)")
    stack = np.stack([_read_gray(frame) for frame in frames])
    metadata = {"source": str(folder), "frames": [f.name for f in frames], "pixel_size_um": T98G_UM_PER_PIXEL,
                "frame_interval_min": T98G_MINUTES_PER_FRAME, "licence": T98G_LICENCE}
    kwargs = {"name": "T98G time-lapse (Usiigaci)", "metadata": metadata,
              "scale": (T98G_MINUTES_PER_FRAME, T98G_UM_PER_PIXEL, T98G_UM_PER_PIXEL), "units": ("minute", "µm", "µm"),
              "axis_labels": ("t", "y", "x")}
    return [(stack, kwargs, "image")]


def _read_gray(path: Path) -> np.ndarray:
    """A 2-D image through the runtime's decoder and limits, in its own dtype where it is gray."""
    pixels = decode_image(path.read_bytes())
    return pixels if pixels.ndim == 2 else to_grayscale(pixels)
