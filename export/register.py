"""Register an ONNX model in the BentoML model store (`python -m export register`)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from cellseg.onnx_model import DEFAULT_MODEL, default_model_path, read_metadata, sha256_file
from cellseg.variants import INT8_TOLERANCE, check_int8_pair, default_precision, variant_metrics

MODEL_NAME = "livecell-unet"
SHIPPED_MODEL = DEFAULT_MODEL  # the only file that may be registered as MODEL_NAME
MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"


def find_registered(sha256: str, name: str = MODEL_NAME, int8_sha256: str | None = None):
    """The stored model of this name whose files have these sha256s, if any."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        models = bentoml.models.list(name)
    except NotFound:  # no model of that name yet
        return None
    for model in models:
        meta = model.info.metadata
        stored_int8 = (meta.get("variants") or {}).get("int8", {}).get("sha256")
        if meta.get("sha256") == sha256 and stored_int8 == int8_sha256:
            return model
    return None


def metrics_measured_on(meta: dict) -> str:
    """Which images a model's recorded figures come from, in words."""
    finetune = meta.get("finetune")
    if finetune:
        held = finetune.get("held_back") or []
        return f"{len(held)} held-back images" if held else "its training images"
    split = (meta.get("metrics") or {}).get("split", "val")
    return "validation split" if split == "val" else f"{split} split"


def register(path: Path, name: str = MODEL_NAME, int8: Path | None = None):
    """Put `path` (fp32) and its int8 variant, if any, in the model store as one model (idempotent:
    the same files return the existing entry). Its metadata records which precision to serve by
    default (`default_precision`); the service's CELLSEG_PRECISION overrides it."""
    import bentoml

    sha256 = sha256_file(path)
    int8_sha256 = sha256_file(int8) if int8 else None
    existing = find_registered(sha256, name, int8_sha256)
    if existing is not None:
        return existing, False
    meta = read_metadata(path)
    fp32_metrics = variant_metrics(path)
    variants = {"fp32": {"file": MODEL_FILE, "sha256": sha256, "metrics": fp32_metrics}}
    if int8:
        variants["int8"] = {"file": INT8_FILE, "sha256": int8_sha256, "metrics": variant_metrics(int8)}
    metadata = {
        "sha256": sha256,
        "file": MODEL_FILE,
        "normalization": meta.get("normalization"),
        "postprocess": meta.get("postprocess"),
        "tta": bool(meta.get("tta", False)),  # the model's own TTA default (fine-tuned models: on)
        "output_channels": meta.get("output_channels"),
        "input": meta.get("input"),
        "metrics": fp32_metrics,
        "license": meta.get("license"),
        "variants": variants,
        "default_precision": default_precision(fp32_metrics, variants.get("int8", {}).get("metrics")),
        "int8_tolerance": INT8_TOLERANCE,
        "metrics_on": metrics_measured_on(meta),
    }
    labels = {"task": "instance-segmentation", "dataset": "livecell", "format": "onnx",
              "architecture": "unet-" + str((meta.get("architecture") or {}).get("encoder", "unknown")),
              "license": "cc-by-nc-4.0"}
    card = path.parent / "MODEL_CARD.md"  # the card `python -m export` and finetune write beside the model
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        shutil.copyfile(path, model.path_of(MODEL_FILE))
        if int8:
            shutil.copyfile(int8, model.path_of(INT8_FILE))
        if card.is_file():  # travels with the model into bentos and containers
            shutil.copyfile(card, model.path_of("MODEL_CARD.md"))
    return bentoml.models.get(model.tag), True


class RegisterError(ValueError):
    """The model cannot be registered as asked: one line says why."""


def check_name(name: str) -> str:
    """A model-store name as BentoML accepts it (no version: the store gives one)."""
    from bentoml._internal.tag import validate_tag_str

    if ":" in name:
        raise RegisterError(f"--name {name!r}: give a name without ':' (the store gives each registration a version)")
    try:
        validate_tag_str(name)
    except ValueError:
        raise RegisterError(f"--name {name!r}: use 1-63 letters, digits, '-', '_' or '.', starting and ending with a "
                            "letter or digit") from None
    return name.lower()


def check_model_file(path: Path, what: str = "--model") -> None:
    """An ONNX file of this project's network: one grayscale input (N, 1, H, W) and three output maps
    (N, 3, H, W); anything else would register, serve and answer 500 to every request."""
    import onnx

    if not path.is_file():
        raise RegisterError(f"{what} {path}: no such file")
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001  (protobuf raises several kinds)
        raise RegisterError(f"{what} {path} is not an ONNX file ({type(exc).__name__})") from None

    def dims(value) -> list:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]

    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(inputs) != 1 or len(graph.output) != 1 or len(dims(inputs[0])) != 4 or dims(inputs[0])[1] != 1 \
            or len(dims(graph.output[0])) != 4 or dims(graph.output[0])[1] != 3:
        shapes = [dims(i) for i in inputs], [dims(o) for o in graph.output]
        raise RegisterError(f"{what} {path} is not a cellseg network (inputs {shapes[0]}, outputs {shapes[1]}; "
                            "expected one (N, 1, H, W) input and one (N, 3, H, W) output)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export register", description=__doc__)
    p.add_argument("--model", type=Path, default=None,
                   help=f"ONNX file to register (default: the shipped model, {default_model_path()}; required with "
                        "another --name)")
    p.add_argument("--int8", type=Path, default=None,
                   help="its int8 variant (default: <model>.int8.onnx beside it, if present)")
    p.add_argument("--no-int8", action="store_true", help="register the fp32 model alone")
    p.add_argument("--force", action="store_true",
                   help="register a fine-tuned model whose run found it not better than its base (metrics.json)")
    p.add_argument("--name", default=None,
                   help=f"model-store name (default {MODEL_NAME}, which only the shipped model may take: it is what "
                        "the service serves by default)")
    args = p.parse_args(argv)
    try:
        model, created = register_checked(args)
    except RegisterError as exc:
        print(f"python -m export register: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary(model, created)))
    return 0


def finetune_verdict(model: Path) -> dict | None:
    """The verdict `python -m train finetune` wrote into a model it made (its metadata), else beside it
    (its metrics.json: models made before the metadata carried it), if any."""
    stored = read_metadata(model).get("finetune") or {}
    if stored.get("verdict"):
        return stored["verdict"]
    metrics = Path(model).parent / "metrics.json"
    try:
        return json.loads(metrics.read_text()).get("verdict") if metrics.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def register_checked(args: argparse.Namespace):
    """`register` after checking the name and the files (RegisterError names what is wrong)."""
    name = check_name(MODEL_NAME if args.name is None else args.name)
    model = args.model
    if model is None:
        if name != MODEL_NAME:  # the shipped file under a lab's name: it would serve, and nobody would notice
            raise RegisterError(f"--name {args.name} needs --model, the file to register under it (e.g. --model "
                                "runs/astro/model.onnx); without it the shipped model would be registered as "
                                f"{name}")
        model = default_model_path()
    check_model_file(model)
    if name == MODEL_NAME and sha256_file(model) != sha256_file(SHIPPED_MODEL):
        raise RegisterError(f"{model} is not the shipped model: register it under a name of its own "
                            f"(--name my-lab), so that {MODEL_NAME}:latest, which the service serves by default, "
                            "stays the shipped model")
    verdict = finetune_verdict(model)
    if verdict and verdict.get("outcome") == "not better" and not getattr(args, "force", False):
        raise RegisterError(f"{model}'s fine-tuning found it not better than its base ({verdict.get('line')}); "
                            "keep the base model, or --force to register it anyway")
    if verdict and verdict.get("outcome") == "can't tell":  # registered, but not as if it had been shown better
        print(f"python -m export register: note: its fine-tuning could not tell whether it is better than its base "
              f"({verdict.get('line')}); measure it on annotated images of other plates or days (cellseg evaluate "
              "--model) before you serve it in place of the base", file=sys.stderr)
    int8 = None if args.no_int8 else (args.int8 or model.with_suffix(".int8.onnx"))
    if int8 is not None and not int8.is_file():
        if args.int8:
            raise RegisterError(f"--int8 {int8}: no such file")
        int8 = None
    if int8 is not None:
        check_model_file(int8, "--int8")
        try:
            check_int8_pair(model, int8)
        except ValueError as exc:
            raise RegisterError(f"{exc}; or register the fp32 file alone with --no-int8") from exc
    return register(model, name, int8)


def summary(model, created: bool) -> dict:
    """What `register` prints: the sha256 of each precision's file, and which precision the service
    runs by default, whose file's sha256 is the `model.sha256` of its answers."""
    meta = model.info.metadata
    return {"tag": str(model.tag), "created": created,
            "sha256": {precision: variant["sha256"] for precision, variant in sorted(meta["variants"].items())},
            "default_precision": meta["default_precision"], "path": model.path}
