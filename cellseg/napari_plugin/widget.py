"""The dock widget: segment the selected image (a frame or a whole time-lapse) in a thread worker,
show labels and outlines, re-threshold from the cached maps, measure (px and µm), save corrections
as training examples, fine-tune and switch to the new model. The work itself is `engine`'s."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import create_widget
from napari.qt.threading import thread_worker as napari_thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from cellseg.batch import frame_name
from cellseg.inference import Segmentation, decode_maps
from cellseg.napari_plugin import engine
from cellseg.postprocess import PostprocessParams

SCOPES = ("current frame", "all frames")
DEFAULT_TARGETS = {engine.SHIPPED: "", engine.FILE: "", engine.REGISTERED: "livecell-unet:latest",
                   engine.SERVER: "http://localhost:3000"}
# The table's columns: (record key, header); the µm columns show where the pixel size is known.
TABLE_COLUMNS = (("cell_id", "cell"), ("area", "area px²"), ("area_um2", "area µm²"), ("perimeter", "perimeter px"),
                 ("perimeter_um", "perimeter µm"), ("eccentricity", "eccentricity"), ("score", "score"))
WORK_FOLDER = Path.home() / "cellseg"


def thread_worker(work):
    """napari's generator thread worker, its failure yielded as ("error", exception): the widget shows
    it and stays usable (a raised one would go to napari's global handler as a crash report)."""
    @functools.wraps(work)
    def reporting(*args, **kwargs):
        try:
            yield from work(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  (any failure of the work is the user's to read)
            yield ("error", exc)
    return napari_thread_worker(reporting)


@dataclass
class LayerPair:
    """An image layer's labels and outlines layers (one array), and the frames the user painted since
    they were last segmented."""

    source: object
    labels: object
    outlines: object
    edited: set = field(default_factory=set)

    @property
    def layers(self) -> tuple:
        return self.labels, self.outlines


class CellsegWidget(QWidget):
    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.model = None  # engine.LocalModel | engine.ServerModel, loaded on first use
        self.model_choice: engine.ModelChoice | None = None
        self.results: dict[int | None, engine.FrameResult] = {}
        self.records: dict[int | None, dict] = {}
        self.source = None  # the image layer the results belong to
        self.layer_pairs: dict[int, LayerPair] = {}  # by id of the image layer
        self.labels_layer = None  # the current image's (its LayerPair's)
        self.outlines_layer = None
        self.edited: set[int | None] = set()
        self.worker = None
        self.finetune: engine.FinetuneRun | None = None
        self.pending = None  # the image layer a running Segment is for
        self.base_params = PostprocessParams()  # the chosen model's thresholds, the widget's three over them
        self.finetuned_model: Path | None = None
        self.busy = False
        content = QWidget()
        layout = QVBoxLayout(content)
        layout.addWidget(self._segment_box())
        layout.addWidget(self._measure_box())
        layout.addWidget(self._train_box())
        layout.addStretch(1)
        scroll = QScrollArea()  # on a small screen the panel scrolls instead of squeezing the canvas
        scroll.setWidgetResizable(True)
        scroll.setWidget(content)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        self.setMinimumWidth(400)
        self.viewer.layers.events.inserted.connect(self.image_choice.reset_choices)
        self.viewer.layers.events.removed.connect(self.image_choice.reset_choices)
        self.viewer.dims.events.current_step.connect(lambda _event: self.show_table())
        self._show_params(engine.file_params(engine.default_model_path()))  # what the first Segment applies
        self._update_buttons()

    # ---- layout ----
    def _segment_box(self) -> QGroupBox:
        box, form = QGroupBox("Segment"), QFormLayout()
        self.image_choice = create_widget(annotation=napari.layers.Image, label="image")
        form.addRow("image", self.image_choice.native)
        self.model_kind = QComboBox()
        self.model_kind.addItems(engine.MODEL_KINDS)
        self.model_target = QLineEdit()
        self.browse = QPushButton("…")
        self.browse.setToolTip("choose an ONNX file (e.g. a fine-tune's model.onnx)")
        self.browse.clicked.connect(self._browse_model)
        self.model_target.editingFinished.connect(self._model_changed)
        row = QHBoxLayout()
        row.addWidget(self.model_target)
        row.addWidget(self.browse)
        self.model_kind.currentTextChanged.connect(self._model_kind_changed)
        form.addRow("model", self.model_kind)
        form.addRow("", row)
        self.model_status = QLabel("not loaded")
        self.model_status.setWordWrap(True)
        form.addRow("", self.model_status)
        self.fg_threshold = self._spin(0.01, 0.99, 0.05, "foreground probability above which a pixel is cell")
        self.seed_threshold = self._spin(0.01, 0.99, 0.05, "core score above which a pixel seeds a cell (lower: fewer splits)")
        self.min_size = QSpinBox()
        self.min_size.setRange(0, 1_000_000)
        self.min_size.setToolTip("cells smaller than this many pixels are dropped")
        form.addRow("foreground", self.fg_threshold)
        form.addRow("seed", self.seed_threshold)
        form.addRow("min size px", self.min_size)
        self.scope = QComboBox()
        self.scope.addItems(SCOPES)
        form.addRow("time-lapse", self.scope)
        buttons = QHBoxLayout()
        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self.segment)
        self.rethreshold_button = QPushButton("Apply thresholds")
        self.rethreshold_button.setToolTip("new thresholds on the network's cached maps: the network does not run again")
        self.rethreshold_button.clicked.connect(self.rethreshold)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        for button in (self.segment_button, self.rethreshold_button, self.cancel_button):
            buttons.addWidget(button)
        form.addRow(buttons)
        self.progress = QProgressBar()
        form.addRow(self.progress)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        form.addRow(self.status)
        box.setLayout(form)
        return box

    def _measure_box(self) -> QGroupBox:
        box, layout = QGroupBox("Measurements (current frame)"), QVBoxLayout()
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        layout.addWidget(self.summary)
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels([header for _, header in TABLE_COLUMNS])
        self.table.setSelectionBehavior(QTableWidget.SelectRows)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.table.itemSelectionChanged.connect(self._row_selected)
        self.table.setMinimumHeight(220)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        layout.addWidget(self.table)
        buttons = QHBoxLayout()
        self.measure_button = QPushButton("Measure again")
        self.measure_button.setToolTip("after correcting the labels")
        self.measure_button.clicked.connect(self.measure)
        self.export_button = QPushButton("Export CSV…")
        self.export_button.clicked.connect(self._export_dialog)
        buttons.addWidget(self.measure_button)
        buttons.addWidget(self.export_button)
        layout.addLayout(buttons)
        box.setLayout(layout)
        return box

    def _train_box(self) -> QGroupBox:
        box, form = QGroupBox("Correct and fine-tune"), QFormLayout()
        hint = QLabel("Correct the labels with napari's own tools (paint, erase, fill, new label), then save.")
        hint.setWordWrap(True)
        form.addRow(hint)
        self.examples_folder = QLineEdit(str(WORK_FOLDER / "training"))
        form.addRow("examples", self.examples_folder)
        self.save_button = QPushButton("Save as training example")
        self.save_button.clicked.connect(self.save_example)
        form.addRow(self.save_button)
        self.runs_folder = QLineEdit(str(WORK_FOLDER / "finetuned"))
        form.addRow("runs", self.runs_folder)
        self.minutes = self._spin(0.05, 240.0, 1.0, "the whole run's budget: measuring, training, export, int8")
        self.minutes.setValue(10.0)
        form.addRow("minutes", self.minutes)
        self.train_network = QCheckBox("train the network")
        self.train_network.setChecked(True)
        self.train_network.setToolTip("unticked: keep the model's network and only pick thresholds, test-time "
                                      "augmentation and a cell filter for your examples, in a minute or two (the "
                                      "safer gain on cells the model already knows; docs/METRICS.md)")
        form.addRow(self.train_network)
        buttons = QHBoxLayout()
        self.finetune_button = QPushButton("Fine-tune")
        self.finetune_button.clicked.connect(self.start_finetune)
        self.use_button = QPushButton("Use this model")
        self.use_button.clicked.connect(self.use_finetuned)
        buttons.addWidget(self.finetune_button)
        buttons.addWidget(self.use_button)
        form.addRow(buttons)
        self.verdict = QLabel("")
        self.verdict.setWordWrap(True)
        self.verdict.setTextInteractionFlags(Qt.TextSelectableByMouse)
        form.addRow(self.verdict)
        box.setLayout(form)
        return box

    @staticmethod
    def _spin(low: float, high: float, step: float, tip: str) -> QDoubleSpinBox:
        spin = QDoubleSpinBox()
        spin.setRange(low, high)
        spin.setSingleStep(step)
        spin.setDecimals(2)
        spin.setToolTip(tip)
        return spin

    def _model_kind_changed(self, kind: str) -> None:
        self.model_target.setText(DEFAULT_TARGETS[kind])
        self.model_target.setEnabled(kind != engine.SHIPPED)
        self.browse.setEnabled(kind in (engine.SHIPPED, engine.FILE))
        self._model_changed()

    def _model_changed(self) -> None:
        """A newly chosen model: say it loads on the next Segment, and show a file's own thresholds now
        (a registered model's or a server's are shown once it is loaded)."""
        try:
            choice = self.chosen_model()
        except ValueError:
            self.model_status.setText("choose a model")
            return
        if choice == self.model_choice:
            return
        self.model_status.setText(f"{choice.kind}: loads on the next Segment")
        self.model_status.setToolTip("")
        path = engine.default_model_path() if choice.kind == engine.SHIPPED else Path(choice.target).expanduser()
        if choice.kind in (engine.SHIPPED, engine.FILE) and path.is_file():
            try:
                self._show_params(engine.file_params(path))
            except Exception:  # noqa: BLE001  (not an ONNX file: Segment will say so)
                pass

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "ONNX model", "", "ONNX models (*.onnx)")
        if path:
            self.model_kind.setCurrentText(engine.FILE)
            self.model_target.setText(path)
            self._model_changed()

    def _update_buttons(self) -> None:
        self.segment_button.setEnabled(not self.busy)
        self.cancel_button.setEnabled(self.busy)
        cached = bool(self.results) and all(r.codes is not None for r in self.results.values())
        self.rethreshold_button.setEnabled(not self.busy and bool(self.results) and (cached or self.model is not None))
        self.save_button.setEnabled(self.labels_layer is not None)
        self.finetune_button.setEnabled(not self.busy)
        self.use_button.setEnabled(self.finetuned_model is not None and self.finetuned_model.is_file())
        self.export_button.setEnabled(bool(self.records))
        self.measure_button.setEnabled(bool(self.results))

    # ---- model and thresholds ----
    def chosen_model(self) -> engine.ModelChoice:
        return engine.ModelChoice(self.model_kind.currentText(), self.model_target.text().strip())

    def params(self) -> PostprocessParams:
        return self.base_params.with_overrides(fg_threshold=round(self.fg_threshold.value(), 2),
                                               seed_threshold=round(self.seed_threshold.value(), 2),
                                               min_size=self.min_size.value())

    def _show_params(self, params: PostprocessParams) -> None:
        """A model's thresholds into the widget; the ones it does not show (seed peak, merging...) kept."""
        self.base_params = params
        self.fg_threshold.setValue(params.fg_threshold)
        self.seed_threshold.setValue(params.seed_threshold)
        self.min_size.setValue(params.min_size)

    def _ensure_model(self) -> bool:
        """Load the chosen model where it changed (in the worker: a first load checks int8 on this CPU)."""
        choice = self.chosen_model()
        if self.model is None or choice != self.model_choice:
            self.model, self.model_choice = engine.load_model(choice), choice
            return True
        return False

    # ---- segmenting ----
    def segment(self) -> None:
        layer = self.image_choice.value
        if layer is None:
            show_error("cellseg: open an image first (File › Open, or File › Open Sample › cellseg)")
            return
        try:
            frames = engine.frames_of(layer.data.shape, layer.rgb, self.scope.currentText(), self._current_frame(layer))
            engine.check_frames_are_times(getattr(layer.source, "path", None), frames)
            self.chosen_model()
        except ValueError as exc:
            self._on_error(exc)
            return
        self.pending = layer  # its results replace the last layer's once its first frame is done
        self._start(self._segment_work(layer, frames, self.params()), len(frames),
                    f"segmenting {len(frames)} frame(s) of {layer.name}")

    def _current_frame(self, layer) -> int:
        spatial = 3 if layer.rgb else 2
        if layer.ndim <= spatial:
            return 0
        step = self.viewer.dims.current_step[self.viewer.dims.ndim - layer.ndim]
        return int(min(max(step, 0), layer.data.shape[0] - 1))

    def _shown_frame(self) -> int | None:
        """The key of the results shown: None for a 2-D image, else the time-lapse's current frame."""
        return None if None in self.results else self._current_frame(self.source)

    @thread_worker
    def _segment_work(self, layer, frames, params: PostprocessParams):
        """`params`: the widget's thresholds, read in the GUI thread (a file's own are shown when it is
        chosen); a registered model or a server, newly loaded, runs with its own (shown then)."""
        if self._ensure_model():
            yield ("model", None)
            if self.model_choice.kind in (engine.REGISTERED, engine.SERVER):
                params = self.model.default_params
        for done, (frame, result) in enumerate(engine.segment_frames(self.model, layer.data, frames, params), start=1):
            yield ("frame", (frame, result, done))

    def _start(self, worker, total: int, message: str, on_done=None) -> None:
        self.busy, self.worker = True, worker
        self._on_done = on_done or self._segmented
        self.progress.setRange(0, total)
        self.progress.setValue(0)
        self.status.setText(message)
        worker.yielded.connect(self._on_yield)
        worker.finished.connect(self._on_finished)
        self._update_buttons()
        worker.start()

    def _on_yield(self, item) -> None:
        kind, value = item
        if kind == "model":
            self.model_status.setText(self.model.description)
            self.model_status.setToolTip(self.model.reason)
            if self.model_choice.kind in (engine.REGISTERED, engine.SERVER):
                self._show_params(self.model.default_params)
        elif kind == "frame":
            frame, result, done = value
            if self.pending is not None and self.pending is not self.source:
                self.results, self.records, self.source = {}, {}, self.pending
            self.pending = None
            self.results[frame] = result
            self._put_labels(frame, result.labels)
            self.progress.setValue(done)
        elif kind == "progress":
            self.progress.setValue(value)
        elif kind == "error":
            self._on_error(value)
        elif kind == "line":
            self.status.setText(value if len(value) <= 160 else value[:159] + "…")

    def _on_error(self, exc: Exception) -> None:
        self.status.setText(f"failed: {exc}")
        show_error(f"cellseg: {exc}")

    def _on_finished(self) -> None:
        self.busy, self.worker = False, None
        self._on_done()
        self._update_buttons()

    def _segmented(self) -> None:
        self.pending = None
        if self.results:
            self.measure()
            if self.status.text().startswith(("segmenting", "applying")):
                self.status.setText(f"done: {self.progress.value()} frame(s)")

    def cancel(self) -> None:
        if self.worker is None:
            return
        self.worker.quit()  # a generator worker stops at its next frame (or line of a fine-tune's output)
        if self.finetune is not None and self.finetune.returncode is None:
            self.finetune.cancel()  # ends the fine-tuning process itself
            self.status.setText("fine-tuning cancelled")
        else:
            self.status.setText(f"cancelled after {self.progress.value()} of {self.progress.maximum()} frame(s); "
                                "those done are kept")

    def rethreshold(self) -> None:
        frames = list(self.results)
        self._start(self._rethreshold_work(frames, self.params()), len(frames),
                    f"applying thresholds to {len(frames)} frame(s)")

    @thread_worker
    def _rethreshold_work(self, frames, params: PostprocessParams):
        for done, frame in enumerate(frames, start=1):
            result = self.results[frame]
            if result.codes is not None:  # from the cached maps: no network
                labels, scores = engine.labels_from_codes(result.codes, params)
                result = engine.FrameResult(result.codes, labels, scores)
            else:  # a server returns cells, not maps: ask it again
                image, original = engine.frame_pixels(self.source.data, frame)
                result = self.model.segment(image, params, original)
            yield ("frame", (frame, result, done))

    # ---- layers ----
    def _labels_shape(self) -> tuple[int, ...]:
        layer = self.source
        return layer.data.shape[:-1] if layer.rgb else layer.data.shape

    def _put_labels(self, frame: int | None, labels: np.ndarray) -> None:
        self._use_layers_of(self.source)
        if frame in self.edited:
            self._keep_corrections()
        target = self.labels_layer.data
        if frame is None:
            target[:] = labels
        else:
            target[frame] = labels
        self.labels_layer.refresh()
        self.outlines_layer.refresh()

    def _use_layers_of(self, source) -> None:
        """Make the labels and outlines layers of `source` current: its own pair where it has one still
        in the viewer (found by identity: napari renames a second 'X cells' to 'X cells [1]'), else a
        new pair; both placed on the image as it is placed now (scale, translate, units)."""
        pair = self.layer_pairs.get(id(source))
        if pair is None or pair.source is not source or any(layer not in self.viewer.layers for layer in pair.layers) \
                or pair.labels.data.shape != self._labels_shape():
            data = np.zeros(self._labels_shape(), dtype=np.int32)
            # placed as the image from the start: added at scale 1, they would move napari's current frame
            place = {"scale": source.scale[-data.ndim:], "translate": source.translate[-data.ndim:],
                     "units": source.units[-data.ndim:]}
            labels = self.viewer.add_labels(data, name=f"{source.name} cells", opacity=0.45, **place)
            outlines = self.viewer.add_labels(data, name=f"{source.name} outlines", opacity=1.0, **place)
            outlines.contour = 2  # the same array, drawn as outlines: corrections show in both
            outlines.editable = False
            pair = LayerPair(source, labels, outlines)
            labels.events.paint.connect(lambda _event, pair=pair: self._painted(pair))
            self.layer_pairs[id(source)] = pair
            self.viewer.layers.selection.active = labels
        for layer in pair.layers:  # the image may have been rescaled since
            place = {key: tuple(getattr(source, key)[-layer.ndim:]) for key in ("scale", "translate", "units")}
            for key, value in place.items():
                if tuple(getattr(layer, key)) != value:
                    setattr(layer, key, value)
        self.labels_layer, self.outlines_layer, self.edited = pair.labels, pair.outlines, pair.edited

    def _painted(self, pair: LayerPair) -> None:
        pair.outlines.refresh()
        stack = pair.labels.ndim > 2
        pair.edited.add(self._current_frame(pair.source) if stack else None)

    def _keep_corrections(self) -> None:
        """The user's painted labels, about to be replaced by a new run, kept as a layer of their own."""
        kept = self.viewer.add_labels(self.labels_layer.data.copy(), name=f"{self.labels_layer.name} (your corrections)",
                                      scale=self.labels_layer.scale, translate=self.labels_layer.translate,
                                      units=self.labels_layer.units, visible=False)
        self.edited.clear()
        self.viewer.layers.selection.active = self.labels_layer
        show_info(f"cellseg: your corrections were kept as the layer '{kept.name}' (hidden)")

    def frame_labels(self, frame: int | None) -> np.ndarray:
        data = self.labels_layer.data
        return np.asarray(data if frame is None else data[frame])

    # ---- measurements ----
    def pixel_size(self):
        source = getattr(self.source.source, "path", None)
        return engine.layer_pixel_size(self.source.scale, self.source.units, source)

    def measure(self) -> None:
        """Measure every segmented frame from the labels as they are now (corrections included)."""
        if not self.results or self.labels_layer is None:
            return
        size = self.pixel_size()
        frames = len(self.source.data) if None not in self.results else 1
        for frame, result in self.results.items():
            labels = self.frame_labels(frame)
            image, _ = engine.frame_pixels(self.source.data, frame)
            self.records[frame] = engine.frame_record(image, labels, self._scores(labels, result), self.source.name,
                                                      frame, frames, size, engine.frame_seconds(self.source, frame))
        self.show_table()
        self._update_buttons()

    @staticmethod
    def _scores(labels: np.ndarray, result: engine.FrameResult) -> np.ndarray | None:
        """Each cell's score (Segmentation.scores: the model's cell filter's P(annotated), or the mean
        foreground probability for a model without one): the run's own while the labels are still its
        own, else from the cached maps (so a painted cell has one, on the same scale); none for painted
        server labels."""
        if np.array_equal(labels, result.labels):
            return result.scores
        if result.codes is None:
            return None
        return Segmentation(labels, decode_maps([result.codes])[0], result.cell_filter).scores()

    def show_table(self) -> None:
        if self.source is None or not self.records:
            return
        frame = self._shown_frame()
        record = self.records.get(frame)
        self.table.setRowCount(0)
        if record is None:
            self.summary.setText(f"frame {frame}: not segmented")
            return
        size = record["pixel_size"]
        unit = f"pixel size {size['x_um']:.4g} µm ({size['source']})" if size else "pixel size unknown: px only"
        self.summary.setText(f"{record['count']} cells, confluence {record['confluence']:.1f}%; {unit}")
        for column, (key, _) in enumerate(TABLE_COLUMNS):  # µm columns only where the size is known
            self.table.setColumnHidden(column, key.endswith(("_um", "_um2")) and not size)
        self.table.setRowCount(len(record["cells"]))
        for row, cell in enumerate(record["cells"]):
            for column, (key, _) in enumerate(TABLE_COLUMNS):
                value = cell.get(key)
                self.table.setItem(row, column, QTableWidgetItem("" if value is None else f"{value:g}"))

    def _row_selected(self) -> None:
        """Select a row: its cell is the labels layer's selected label, and the view centres on it."""
        rows = {index.row() for index in self.table.selectedIndexes()}
        if len(rows) != 1 or self.labels_layer is None:
            return
        frame = self._shown_frame()
        cell = self.records[frame]["cells"][rows.pop()]
        self.labels_layer.selected_label = cell["cell_id"]
        self.labels_layer.show_selected_label = True
        y, x = cell["centroid_y"], cell["centroid_x"]
        scale, translate = self.source.scale[-2:], self.source.translate[-2:]
        center = list(self.viewer.camera.center)
        center[-2:] = [y * scale[0] + translate[0], x * scale[1] + translate[1]]
        self.viewer.camera.center = center

    def _export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "cells CSV", f"{self.source.name}_cells.csv", "CSV (*.csv)")
        if path:
            self.export_csv(Path(path))

    def export_csv(self, path: Path) -> tuple[Path, Path]:
        self.measure()
        cells, summary = engine.write_tables(path, [self.records[f] for f in sorted(self.records, key=lambda f: f or 0)])
        show_info(f"cellseg: wrote {cells} and {summary}")
        return cells, summary

    # ---- corrections and fine-tuning ----
    def save_example(self) -> tuple[Path, Path] | None:
        """The current frame and its labels as corrected, as a training example."""
        if self.labels_layer is None:
            return None
        frame = self._shown_frame()
        name = self.source.name if frame is None else frame_name(self.source.name, frame, len(self.source.data))
        image = np.asarray(self.source.data if frame is None else self.source.data[frame])
        try:
            paths = engine.save_training_example(Path(self.examples_folder.text()).expanduser(), name, image,
                                                 self.frame_labels(frame))
        except (OSError, ValueError) as exc:
            show_error(f"cellseg: {exc}")
            return None
        count = len(list(paths[0].parent.glob("*_masks.png")))
        self.verdict.setText(f"saved {paths[1].name}: {count} example(s) in {paths[0].parent}")
        return paths

    def start_finetune(self) -> None:
        examples = Path(self.examples_folder.text()).expanduser()
        if not any(examples.glob("*_masks.png")):
            show_error(f"cellseg: no training examples in {examples}: correct a segmentation and save it first")
            return
        self.finetune = engine.FinetuneRun(examples, engine.new_run_folder(Path(self.runs_folder.text()).expanduser()),
                                           self.minutes.value(), train=self.train_network.isChecked())
        self.verdict.setText(f"fine-tuning for at most {self.minutes.value():g} min into {self.finetune.out} …")
        self._start(self._finetune_work(self.finetune), 1000, "fine-tuning", on_done=self._finetuned)

    @thread_worker
    def _finetune_work(self, run: engine.FinetuneRun):
        for line, fraction in run.stream():
            yield ("progress", min(990, round(1000 * fraction)))  # time spent; full only at its verdict
            yield ("line", line)

    def _finetuned(self) -> None:
        """The run's verdict, first; its model offered where it wrote one (a NOT BETTER model too: the
        verdict says so, and the choice is the user's)."""
        run = self.finetune
        if run.cancelled:
            self.verdict.setText(f"fine-tuning cancelled; {run.resume_hint()}")
        elif run.returncode is None:
            self.verdict.setText(f"fine-tuning stopped before its end; nothing to use ({run.out})")
        elif run.verdict:
            written = run.model.is_file()
            self.finetuned_model = run.model if written else None
            self.verdict.setText(run.verdict + (f"\nmodel: {run.model}" if written else ""))
        else:
            self.verdict.setText(f"fine-tuning failed: {run.error}")
        self.progress.setValue(self.progress.maximum() if run.verdict else self.progress.value())

    def use_finetuned(self) -> None:
        """Switch to the fine-tuned model: the next Segment runs it."""
        if self.finetuned_model is None:
            return
        self.model_kind.setCurrentText(engine.FILE)
        self.model_target.setText(str(self.finetuned_model))
        self._model_changed()  # its thresholds shown; it loads on the next Segment
