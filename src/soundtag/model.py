"""LiteRT CNN14 body: log-mel [1, 1, 1001, 64] float32 in, probabilities [1, 527] float32 out.

One wrapper for every user of a model: the tagger, and the converter's validation, which runs the
bytes it is about to write through ``Cnn14Model.from_bytes`` so the gate tests the code that ships.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .errors import InferenceError, ModelError
from .features import N_FRAMES, N_MELS
from .labels import NUM_CLASSES

log = logging.getLogger(__name__)

INPUT_SHAPE = (1, 1, N_FRAMES, N_MELS)  # log-mel, the model card's layout
OUTPUT_SHAPE = (1, NUM_CLASSES)  # sigmoid probabilities
EMBEDDING_SHAPE = (1, 2048)  # optional second output: fc1 + ReLU, upstream CNN14's `embedding`
DEFAULT_THREADS = min(4, os.cpu_count() or 1)  # XNNPACK threads; one per core up to 4


class Cnn14Model:
    """A loaded .tflite CNN14 body. Call it with a log-mel [1001, 64] or [1, 1, 1001, 64].

    Outputs: probabilities float32 [1, 527], and optionally the embedding float32 [1, 2048]
    (``has_embedding``; the fp32 and int8 models of ``soundtag convert`` carry it, the fp16 model keeps
    the model card's single-output signature)."""

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError("model file not found", str(self.path))
        self._load(str(self.path), dict(model_path=str(self.path)), num_threads)

    @classmethod
    def from_bytes(cls, data: bytes, num_threads: int | None = None, name: str = "<bytes>") -> Cnn14Model:
        """A model from flatbuffer bytes (the converter checks what it is about to write this way)."""
        self = cls.__new__(cls)
        self.path = Path(name)
        self._load(name, dict(model_content=bytes(data)), num_threads)
        return self

    def _load(self, name: str, source: dict, num_threads: int | None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        try:
            self._interp = Interpreter(**source, num_threads=num_threads or DEFAULT_THREADS)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"not a LiteRT model ({' '.join(str(exc).split())})", name) from None
        inputs, outputs = self._interp.get_input_details(), self._interp.get_output_details()
        if len(inputs) != 1 or len(outputs) not in (1, 2):
            raise ModelError(f"expected 1 input and 1 or 2 outputs, found {len(inputs)} and {len(outputs)}", name)
        by_shape = {tuple(int(d) for d in det["shape"]): det for det in outputs}
        probs = by_shape.get(OUTPUT_SHAPE) if len(outputs) == 2 else outputs[0]
        emb = by_shape.get(EMBEDDING_SHAPE) if len(outputs) == 2 else None
        if len(outputs) == 2 and (probs is None or emb is None or emb["dtype"] != np.float32):
            shapes = ", ".join(f"{np.dtype(d['dtype']).name}{[int(x) for x in d['shape']]}" for d in outputs)
            raise ModelError(f"outputs are {shapes}, expected float32{list(OUTPUT_SHAPE)} and "
                             f"float32{list(EMBEDDING_SHAPE)} (not a CNN14 AudioSet model)", name)
        for kind, det, shape in (("input", inputs[0], INPUT_SHAPE), ("output", probs, OUTPUT_SHAPE)):
            got = [int(d) for d in det["shape"]]
            if tuple(got) != shape or det["dtype"] != np.float32:
                raise ModelError(
                    f"{kind} is {np.dtype(det['dtype']).name}{got}, expected float32{list(shape)} "
                    "(not a CNN14 AudioSet model)", name)
        self._in = inputs[0]["index"]
        self._out = probs["index"]
        self._emb = None if emb is None else emb["index"]
        self.precision = _precision(self._interp.get_tensor_details())
        log.info("loaded %s (%s)", name, self.precision)

    @property
    def has_embedding(self) -> bool:
        return self._emb is not None

    def __call__(self, logmel: np.ndarray) -> np.ndarray:
        """Probabilities [527] for one window's log-mel; InferenceError if any is not in [0, 1]."""
        return self.run(logmel)[0]

    def run(self, logmel: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities [527], embedding [2048] or None) for one window's log-mel.

        InferenceError when a probability is not finite or not in [0, 1], or the embedding not finite."""
        x = np.asarray(logmel, dtype=np.float32).reshape(INPUT_SHAPE)
        self._interp.set_tensor(self._in, x)
        self._interp.invoke()
        probs = self._interp.get_tensor(self._out)[0].copy()
        if not (np.isfinite(probs).all() and probs.min() >= 0.0 and probs.max() <= 1.0):
            bad = int(np.count_nonzero(~(np.isfinite(probs) & (probs >= 0) & (probs <= 1))))
            raise InferenceError(f"the model produced {bad} non-finite or out-of-range probabilities")
        if self._emb is None:
            return probs, None
        emb = self._interp.get_tensor(self._emb)[0].copy()
        if not np.isfinite(emb).all():
            raise InferenceError("the model produced a non-finite embedding")
        return probs, emb


def _precision(tensors: list[dict]) -> str:
    """fp32, fp16 (float16 weights) or int8 (dynamic-range int8 weights), from the tensor types."""
    types = {np.dtype(t["dtype"]) for t in tensors}
    if np.dtype(np.int8) in types:
        return "int8"
    if np.dtype(np.float16) in types:
        return "fp16"
    return "fp32"
