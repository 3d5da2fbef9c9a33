"""cellseg in napari: a dock widget that segments, measures, takes corrections and fine-tunes, a
reader/writer for the project's outputs, and sample images (manifest: napari.yaml).

Everything that is not Qt lives in `engine` (models, frames, re-thresholding, measurements, training
examples, fine-tuning runs) on the same `cellseg` runtime as the service and batch jobs; `widget` only
lays it out and runs it in napari's thread workers."""
