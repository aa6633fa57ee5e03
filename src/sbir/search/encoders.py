"""A checkpoint the pipeline wrote, opened as a :class:`SearchEncoder` (photo + sketch encoders in one space).

Loading goes through the library layer (:mod:`sbir.models.checkpoints`), never a training module."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sbir.search.errors import SearchError


@dataclass
class SearchEncoder:
    """A photo encoder and a sketch encoder embedding into one space, with what they expect."""

    name: str                      # model name (a variant, "students", "classifier_only")
    kind: str                      # "students" | "fine_grained" | "classifier_only"
    checkpoint: Path
    checkpoint_sha256: str
    image_size: int                # inputs are resized to this side before the encoders
    embed_dim: int
    photo_fn: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    sketch_fn: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)

    @torch.no_grad()
    def embed_photos(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N,3,H,W) photos of one size -> float (N, D), L2-normalised."""
        return self._embed(self.photo_fn, images)

    @torch.no_grad()
    def embed_sketches(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N,1|3,H,W) sketches (black ink on white) -> float (N, D), L2-normalised."""
        return self._embed(self.sketch_fn, images)

    def _embed(self, fn, images: torch.Tensor) -> torch.Tensor:
        from sbir.models.backbones import resize, to_float

        if len(images) == 0:
            return torch.zeros((0, self.embed_dim))
        x = resize(to_float(images), self.image_size)  # exactly as the evaluate stages feed the models
        return F.normalize(fn(x).float(), dim=1)


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Content hash of a file (streamed; remembered per path, size and mtime within the process)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _torch_load(path: Path) -> dict[str, Any]:
    from sbir.models.checkpoints import read_checkpoint

    try:
        blob = read_checkpoint(path)
    except Exception as exc:  # pickle / zip errors of several types
        raise SearchError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(blob, dict):
        raise SearchError(f"{path}: not a checkpoint of this project (a {type(blob).__name__}, expected a dict)")
    return blob


def _checkpoint_kind(blob: dict[str, Any]) -> str | None:
    if "students" in blob and "params" in blob:
        return "students"
    if "model" in blob and "arch" in blob:
        return "fine_grained"
    if "model" in blob and "num_classes" in blob and "params" in blob:  # teacher_pretrain's teachers.pt
        return "classifier_only"
    return None


def list_models(checkpoint: str | os.PathLike) -> dict[str, Path]:
    """Model names a checkpoint file or folder offers -> the file holding each.

    A students file offers ``students``, a teachers file ``classifier_only``, an F checkpoint its
    variant; a folder (e.g. ``outputs/fgsbir_joint/checkpoints``) offers every model of its ``*.pt``
    files (the generator/discriminator file is skipped: it embeds nothing)."""
    path = Path(checkpoint)
    if not path.exists():
        raise SearchError(f"checkpoint {path} not found (run the pipeline first, or pass --checkpoint)")
    if path.is_dir():
        out: dict[str, Path] = {}
        for f in sorted(path.glob("*.pt")):
            if f.stem.endswith("discriminator"):
                continue
            for name in list_models(f):
                out.setdefault(name, f)
        if not out:
            raise SearchError(f"{path}: no model checkpoint (*.pt) in this folder")
        return out
    blob = _torch_load(path)
    kind = _checkpoint_kind(blob)
    if kind is None:
        raise SearchError(f"{path}: not a students, teachers or fine-grained checkpoint (keys {sorted(blob)[:8]})")
    name = {"students": "students", "classifier_only": "classifier_only"}.get(kind) or str(blob.get("variant", path.stem))
    return {name: path}


def _preferred(models: dict[str, Path]) -> str | None:
    from sbir.fgsbir.evaluate import ORDER

    for name in ("semi", *ORDER, "students"):
        if name in models:
            return name
    return None


def _teachers_image_size(students_path: Path) -> int | None:
    """The students see images at their teachers' size (distill reads it from teachers.pt); the
    students file does not record it, so look for the pipeline's teachers next to it."""
    cand = students_path.resolve().parent.parent / "teacher_pretrain" / "teachers.pt"
    if not cand.is_file():
        return None
    blob = _torch_load(cand)
    size = (blob.get("params") or {}).get("image_size")
    return int(size) if size else None


def load_encoder(checkpoint: str | os.PathLike, model: str | None = None,
                 image_size: int | None = None) -> SearchEncoder:
    """Open a checkpoint (file or folder) and return the chosen model's encoders (eval mode).

    ``model`` picks one of :func:`list_models`; it may be left out when there is one (or, for a
    folder of F checkpoints, the headline ``semi`` model is used). ``image_size`` overrides the
    model's input size (needed only for a students file without the pipeline's teachers.pt two
    folders up)."""
    path = Path(checkpoint)
    models = list_models(path)
    if model is None:
        if len(models) == 1:
            model = next(iter(models))
        else:
            model = _preferred(models)
            if model is None:
                raise SearchError(f"{path} holds several models ({', '.join(models)}): choose one with --model")
    if model not in models:
        raise SearchError(f"{path} has no model {model!r}; it offers: {', '.join(models)}")
    file = models[model]
    return _open_encoder(file, model, _checkpoint_kind(_torch_load(file)), file_sha256(file), image_size)


def _open_encoder(file: Path, model: str, kind: str | None, sha: str, image_size: int | None) -> SearchEncoder:
    """The encoders of one checkpoint file of a known kind, loaded by :mod:`sbir.models.checkpoints`."""
    from sbir.models.checkpoints import load_retrieval_checkpoint, load_students, load_teachers

    if kind == "students":
        pair, blob = load_students(str(file))
        size = image_size or _teachers_image_size(file)
        if size is None:
            raise SearchError(f"{file}: a students file does not record its input size and no "
                              f"teacher_pretrain/teachers.pt was found beside its folder: pass --image-size")
        dim = int(blob["params"]["student"]["embed_dim"])
        return SearchEncoder(model, kind, file, sha, int(size), dim, pair.photo_encoder, pair.sketch_encoder)
    if kind == "fine_grained":
        pair, blob = load_retrieval_checkpoint(file)
        size = image_size or blob["arch"].get("image_size")
        if not size:
            raise SearchError(f"{file}: the checkpoint records no image size: pass --image-size")
        return SearchEncoder(model, kind, file, sha, int(size), int(blob["arch"]["embed_dim"]),
                             pair.photo_encoder, pair.sketch_encoder)
    teachers, blob = load_teachers(str(file))
    size = image_size or int(blob["params"]["image_size"])
    # the evaluate stage's classifier-only baseline: class probabilities as the shared space
    return SearchEncoder(model, "classifier_only", file, sha, int(size), int(blob["num_classes"]),
                         lambda x: teachers.photo_teacher(x).softmax(1),
                         lambda x: teachers.sketch_teacher(x).softmax(1))
