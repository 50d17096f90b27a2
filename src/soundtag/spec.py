"""What a model file is: its architecture, front end, window, outputs and labels (issue #19).

Every model that ``soundtag convert`` writes carries a ``ModelSpec`` as JSON in a named metadata
entry of the .tflite flatbuffer (SPEC_METADATA_NAME); the runtime reads it instead of assuming
CNN14's numbers. A file without one (the model card's ``cnn14_audioset_fp16.tflite``) is recognised
by its signature as CNN14 at 32 kHz (``from_signature``). A spec that disagrees with the file's own
tensors is refused with one line (``ModelSpec.check_signature``).

This is the ONLY module that knows "32 kHz, 1001 frames, 64 mels, 527 classes" as defaults: every
other module asks a spec (the loaded model's, or ``CNN14``) for its numbers.
"""

from __future__ import annotations

import json
import mmap
import types
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import ModelError
from .labels import Label, labels as audioset_labels

SPEC_METADATA_NAME = "soundtag.model_spec"  # the .tflite metadata entry holding the spec's JSON
SPEC_FORMAT = "soundtag.model_spec"
SPEC_VERSION = 1  # bumped when a field changes meaning; a newer file is refused, not misread
INPUT_KINDS = ("logmel", "waveform")  # host log-mel [1, 1, frames, mels], or samples [1, window] (log-mel in the graph)
BUFFER_ALIGNMENT = 16  # bytes; the converter aligns weight buffers so, and so does the re-packing here
TFLITE_IDENTIFIER = b"TFL3"
MAX_SPEC_BYTES = 16 * 1024 * 1024  # a spec is ~30 kB with 527 labels; more is not a spec


@dataclass(frozen=True)
class FrontEnd:
    """The log-mel front end (torchlibrosa Spectrogram + LogmelFilterBank as PANNs use it): periodic
    Hann window of ``n_fft``, center=True with reflect padding, |rFFT|^2, slaney mel filterbank
    (librosa.filters.mel defaults), 10*log10(max(x, 1e-10)).

    Attributes:
        sample_rate: Hz of the waveform it takes.
        n_fft: Samples per STFT frame.
        hop: Samples between frames (10 ms at 32 kHz: 320).
        n_mels: Mel bins.
        fmin: Hz, the lowest mel band edge.
        fmax: Hz, the highest mel band edge.

    Raises:
        ValueError: Non-positive sizes, or band edges outside 0..sample_rate / 2.
    """

    sample_rate: int = 32_000  # Hz
    n_fft: int = 1024  # samples per STFT frame
    hop: int = 320  # samples between frames (10 ms at 32 kHz)
    n_mels: int = 64  # mel bins
    fmin: float = 50.0  # Hz, lowest mel band edge
    fmax: float = 14_000.0  # Hz, highest mel band edge

    def __post_init__(self) -> None:
        ints = (self.sample_rate, self.n_fft, self.hop, self.n_mels)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ints):
            raise ValueError(f"front end: sample_rate, n_fft, hop and n_mels must be positive integers, got {self}")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(f"front end: need 0 <= fmin < fmax <= sample_rate / 2, got {self.fmin}-{self.fmax} Hz")

    @property
    def n_freqs(self) -> int:
        """rFFT bins per frame."""
        return self.n_fft // 2 + 1

    def frames(self, samples: int) -> int:
        """Frames of a waveform of ``samples`` samples (center=True)."""
        return 1 + samples // self.hop

    def describe(self) -> str:
        return (f"{self.sample_rate} Hz / n_fft {self.n_fft} / hop {self.hop} / {self.n_mels} mels / "
                f"{self.fmin:g}-{self.fmax:g} Hz")


CNN14_FRONT_END = FrontEnd()  # 32 kHz, as upstream Cnn14 (and Cnn6/10, the MobileNets, ResNet38, Wavegram)
DEFAULT_WINDOW_S = 10.0  # s; every PANNs AudioSet model was trained on 10 s clips


@dataclass(frozen=True)
class ModelSpec:
    """What a model file is, written into the .tflite by `soundtag convert` and read back at load.

    Attributes:
        architecture: The PANNs architecture, e.g. "Cnn14", "Cnn14_16k", "Cnn14_DecisionLevelMax".
        front_end: The log-mel front end (`FrontEnd`) whose output the model takes.
        input: "logmel" (the host computes the log-mel) or "waveform" (the log-mel is in the graph).
        window_samples: The model's fixed window, in samples at the front end's rate.
        labels: One `Label` per clip output, row = output index (AudioSet's 527, or a trained head's).
        embedding_size: Size of the embedding output (CNN14: 2048); None: the model has none.
        checkpoint_md5: The md5 of the checkpoint it was converted from.
        precision: "fp32", "fp16" or "int8".
        frames_per_segment: A sound event detection model's log-mel frames per time step (32); None:
            a clip model.
        thresholds: A trained head's default decision threshold per class; None: no defaults.
        training: What a trained head was trained on (JSON).
        source: "metadata" (read from the file), or "signature" (the model card's file, recognised).

    Raises:
        ValueError: Fields that contradict each other or the front end.
    """

    architecture: str = "Cnn14"
    front_end: FrontEnd = CNN14_FRONT_END
    input: str = "logmel"  # INPUT_KINDS
    window_samples: int = round(DEFAULT_WINDOW_S * CNN14_FRONT_END.sample_rate)  # the model's fixed window
    labels: tuple[Label, ...] = field(default_factory=audioset_labels)
    embedding_size: int | None = 2048  # the second output (fc1 + ReLU), None: the model has none
    checkpoint_md5: str | None = None
    precision: str | None = None  # fp32, fp16, int8
    # sound event detection (DecisionLevel) models: log-mel frames per step of their second output,
    # segmentwise [1, frames // frames_per_segment, classes] (upstream: 32); None: a clip model
    frames_per_segment: int | None = None
    # a trained head (soundtag train): each class's default decision threshold (the F1-best one on its
    # validation split; None: no default, as for AudioSet's classes), row = output index; None: no defaults
    thresholds: tuple[float | None, ...] | None = None
    training: dict | None = field(default=None, compare=False)  # what a trained head was trained on (JSON)
    source: str = field(default="metadata", compare=False)  # "metadata" or "signature": how it was found

    def __post_init__(self) -> None:
        if self.input not in INPUT_KINDS:
            raise ValueError(f"spec input must be one of {', '.join(INPUT_KINDS)}, got {self.input!r}")
        if isinstance(self.window_samples, bool) or not isinstance(self.window_samples, int) or \
                self.window_samples <= self.front_end.n_fft // 2:
            raise ValueError(f"spec window_samples must be an integer > n_fft / 2, got {self.window_samples!r}")
        if not self.labels or any(lab.index != i for i, lab in enumerate(self.labels)):
            raise ValueError("spec labels must be non-empty and indexed 0..n-1")
        if self.embedding_size is not None and (isinstance(self.embedding_size, bool) or
                                                not isinstance(self.embedding_size, int) or self.embedding_size < 1):
            raise ValueError(f"spec embedding_size must be a positive integer or None, got {self.embedding_size!r}")
        fps = self.frames_per_segment
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= self.frames):
            raise ValueError(f"spec frames_per_segment must be an integer in 1..frames or None, got {fps!r}")
        if self.thresholds is not None and (len(self.thresholds) != len(self.labels) or any(
                t is not None and not (isinstance(t, float) and 0.0 <= t <= 1.0) for t in self.thresholds)):
            raise ValueError("spec thresholds must be one float in [0, 1] (or None) per label")
        if self.training is not None and not isinstance(self.training, dict):
            raise ValueError("spec training must be a JSON object")
        if fps is not None and self.embedding_size is not None:
            raise ValueError("spec: a sound event detection model (frames_per_segment) has no embedding output")

    # --- numbers every consumer reads -------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.front_end.sample_rate

    @property
    def window_s(self) -> float:
        return self.window_samples / self.front_end.sample_rate

    @property
    def frames(self) -> int:
        """Log-mel frames per window (1001 for 10 s at a 10 ms hop)."""
        return self.front_end.frames(self.window_samples)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.input == "waveform":
            return (1, self.window_samples)
        return (1, 1, self.frames, self.front_end.n_mels)

    @property
    def output_shape(self) -> tuple[int, int]:
        return (1, self.num_classes)

    @property
    def framewise(self) -> bool:
        """A sound event detection model: scores per time step besides the clip's."""
        return self.frames_per_segment is not None

    @property
    def segments(self) -> int | None:
        """Segmentwise steps per window (CNN14 DecisionLevel: 1001 // 32 = 31)."""
        return None if self.frames_per_segment is None else self.frames // self.frames_per_segment

    @property
    def frame_hop_s(self) -> float:
        """Seconds between log-mel frames, the resolution of framewise scores (10 ms for the CNN14 family)."""
        return self.front_end.hop / self.front_end.sample_rate

    @property
    def segmentwise_shape(self) -> tuple[int, int, int] | None:
        return None if self.segments is None else (1, self.segments, self.num_classes)

    @property
    def embedding_shape(self) -> tuple[int, int] | None:
        return None if self.embedding_size is None else (1, self.embedding_size)

    def output_roles(self, shapes: list[tuple[int, ...]], name: str) -> tuple[int, int | None]:
        """Positions of (probabilities, second output) among a file's output shapes: the second is the
        embedding (optional) or, for a sound event detection model, the segmentwise scores (required).
        ModelError when they are not what this spec says."""
        if self.framewise:
            want = [self.output_shape, self.segmentwise_shape]
            if len(shapes) == 2 and sorted(shapes) == sorted(want):
                return shapes.index(self.output_shape), shapes.index(self.segmentwise_shape)
            raise ModelError(f"outputs are {', '.join(str(list(s)) for s in shapes)}, but its spec ({self.describe()}) "
                             f"says {' and '.join(str(list(s)) for s in want)}", name)
        want = [self.output_shape] + ([self.embedding_shape] if self.embedding_shape else [])
        if len(shapes) == 1 and shapes[0] == self.output_shape:
            return 0, None  # a model without its embedding output (fp16, waveform): the spec allows it
        if sorted(shapes) == sorted(want) and len(set(want)) == len(want):
            return shapes.index(self.output_shape), shapes.index(self.embedding_shape)
        raise ModelError(f"outputs are {', '.join(str(list(s)) for s in shapes)}, but its spec ({self.describe()}) says "
                         f"{' and optionally '.join(str(list(s)) for s in want)}", name)

    def check_signature(self, input_shape: tuple[int, ...], output_shapes: list[tuple[int, ...]], name: str) -> None:
        """ModelError (one line) unless the file's tensors are what this spec says."""
        if tuple(input_shape) != self.input_shape:
            raise ModelError(f"input is {list(input_shape)}, but its spec ({self.describe()}) says "
                             f"{list(self.input_shape)}", name)
        self.output_roles(output_shapes, name)

    def describe(self) -> str:
        """One line: 'Cnn14_16k, log-mel 16000 Hz / ..., 10 s windows, 527 classes'."""
        kind = "log-mel" if self.input == "logmel" else "waveform (log-mel in the graph)"
        emb = f", embedding {self.embedding_size}" if self.embedding_size else ""
        if self.framewise:
            emb += f", framewise ({self.segments} steps of {self.frames_per_segment} frames)"
        if self.training:
            emb += f", {len(self.training.get('classes', ()))} trained classes"
        return (f"{self.architecture}, {kind} {self.front_end.describe()}, {self.window_s:g} s windows, "
                f"{self.num_classes} classes{emb}")

    def summary(self) -> dict:
        """The spec without its labels, for a report or the server's /info."""
        return {"architecture": self.architecture, "input": self.input, "front_end": asdict(self.front_end),
                "sample_rate": self.sample_rate, "window_samples": self.window_samples, "window_s": self.window_s,
                "frames": self.frames, "classes": self.num_classes, "embedding_size": self.embedding_size,
                "checkpoint_md5": self.checkpoint_md5, "precision": self.precision, "spec_from": self.source,
                "frames_per_segment": self.frames_per_segment, "frame_hop_s": self.frame_hop_s,
                "training": self.training}

    # --- serialisation ----------------------------------------------------------------------
    def to_json(self) -> str:
        d = asdict(self)
        d.pop("source")
        d["labels"] = [[lab.index, lab.mid, lab.name] for lab in self.labels]
        for key in ("thresholds", "training"):
            if d[key] is None:
                d.pop(key)  # a model without a trained head: the spec as before
        return json.dumps({"format": SPEC_FORMAT, "version": SPEC_VERSION, **d}, ensure_ascii=False,
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, name: str = "<spec>") -> ModelSpec:
        """The spec a model file carries; ModelError (one line) when it is not one this version reads."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("format") != SPEC_FORMAT:
                raise ValueError("not a soundtag model spec")
            if not isinstance(d.get("version"), int) or d["version"] > SPEC_VERSION:
                raise ValueError(f"spec version {d.get('version')!r} is newer than this soundtag reads "
                                 f"({SPEC_VERSION}); upgrade soundtag")
            fe = FrontEnd(**d["front_end"])
            labs = tuple(Label(int(i), str(mid), str(n)) for i, mid, n in d["labels"])
            if labs == audioset_labels():
                labs = audioset_labels()  # the shared table: identity checks and caches stay cheap
            return cls(architecture=str(d["architecture"]), front_end=fe, input=d["input"],
                       window_samples=d["window_samples"], labels=labs, embedding_size=d.get("embedding_size"),
                       checkpoint_md5=d.get("checkpoint_md5"), precision=d.get("precision"),
                       frames_per_segment=d.get("frames_per_segment"),
                       thresholds=None if d.get("thresholds") is None else tuple(
                           None if t is None else float(t) for t in d["thresholds"]),
                       training=d.get("training"))
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelError(f"its model spec cannot be read ({' '.join(str(exc).split())})", name) from None

    def with_precision(self, precision: str) -> ModelSpec:
        return replace(self, precision=precision)


CNN14 = ModelSpec()  # upstream Cnn14 at 32 kHz: the model card's model


def from_signature(input_shape: tuple[int, ...], output_shapes: list[tuple[int, ...]], name: str) -> ModelSpec:
    """The spec of a file without one: the model card's CNN14 (log-mel [1, 1, 1001, 64] or, for the
    waveform model, [1, 320000] in; [1, 527] and optionally [1, 2048] out). ModelError otherwise."""
    for kind in INPUT_KINDS:
        spec = replace(CNN14, input=kind, source="signature")
        if tuple(input_shape) == spec.input_shape:
            try:
                spec.output_roles(output_shapes, name)
            except ModelError:
                break
            return spec
    raise ModelError(f"has no soundtag model spec, and its signature (input {list(input_shape)}, outputs "
                     f"{', '.join(str(list(s)) for s in output_shapes)}) is not CNN14's (input "
                     f"{list(CNN14.input_shape)} or {[1, CNN14.window_samples]}, output {list(CNN14.output_shape)}): "
                     "not a soundtag model", name)


# --- the spec inside a .tflite ---------------------------------------------------------------
def read_spec(source: str | Path | bytes, name: str | None = None) -> ModelSpec | None:
    """The spec in a .tflite (a path or flatbuffer bytes), or None when the file has none.
    ModelError when the entry exists but cannot be read."""
    from ai_edge_litert import schema_py_generated as schema

    where = name or (str(source) if isinstance(source, (str, Path)) else "<bytes>")
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            try:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file
                return None
    else:
        buf = source
    try:
        data = _metadata_entry(schema, buf, SPEC_METADATA_NAME)
    except Exception:  # a damaged flatbuffer: the interpreter's load says what is wrong with it
        return None
    finally:
        if isinstance(buf, mmap.mmap):
            buf.close()  # _metadata_entry returns a copy: no view of the mapping survives it
    return None if data is None else ModelSpec.from_json(data, where)


def _metadata_entry(schema, buf, wanted: str) -> bytes | None:
    model = schema.Model.GetRootAs(buf, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if (entry.Name() or b"").decode("utf-8", "replace") != wanted:
            continue
        buffer = model.Buffers(entry.Buffer())
        if buffer.Offset() > 1:  # a large model's buffer stored after the flatbuffer
            if buffer.Size() > MAX_SPEC_BYTES:
                raise ValueError("spec entry too large")
            return bytes(buf[buffer.Offset() : buffer.Offset() + buffer.Size()])
        if buffer.DataLength() > MAX_SPEC_BYTES:
            raise ValueError("spec entry too large")
        return buffer.DataAsNumpy().tobytes() if buffer.DataLength() else b""
    return None


def embed_spec(model: bytes, spec: ModelSpec) -> bytes:
    """The flatbuffer ``model`` with ``spec`` as its SPEC_METADATA_NAME entry (replacing one already
    there); every other table and buffer unchanged, weight buffers kept 16-byte aligned."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    payload = np.frombuffer(spec.to_json().encode("utf-8"), np.uint8)
    entries = [e for e in (m.metadata or []) if (e.name or b"") not in (SPEC_METADATA_NAME, SPEC_METADATA_NAME.encode())]
    buffer = schema.BufferT()
    buffer.data = payload
    m.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = SPEC_METADATA_NAME
    entry.buffer = len(m.buffers) - 1
    m.metadata = entries + [entry]
    raw = np.frombuffer(model, np.uint8)
    for b in m.buffers:  # a buffer stored after the flatbuffer (offset, size: ai-edge-quantizer writes them) goes inline
        if b.offset > 1:
            b.data, b.offset, b.size = raw[b.offset : b.offset + b.size], 0, 0
    builder = flatbuffers.Builder(len(model) + payload.size + (1 << 20))
    for b in m.buffers:  # each weight buffer as a 16-byte aligned vector (CreateNumpyVector aligns to 1)
        if isinstance(b.data, np.ndarray) and b.data.size:
            b.Pack = types.MethodType(_prepacked(_aligned_vector(builder, b.data)), b)
    builder.Finish(m.Pack(builder), file_identifier=TFLITE_IDENTIFIER)
    return bytes(builder.Output())


def _aligned_vector(builder, data: np.ndarray) -> int:
    raw = np.ascontiguousarray(data, np.uint8).tobytes()
    builder.StartVector(1, len(raw), BUFFER_ALIGNMENT)
    builder.head -= len(raw)
    builder.Bytes[builder.head : builder.head + len(raw)] = raw
    builder.vectorNumElems = len(raw)
    return builder.EndVector()


def _prepacked(data_offset: int):
    def pack(self, builder):
        from ai_edge_litert import schema_py_generated as schema

        schema.BufferStart(builder)
        schema.BufferAddData(builder, data_offset)
        schema.BufferAddOffset(builder, self.offset)
        schema.BufferAddSize(builder, self.size)
        return schema.BufferEnd(builder)

    return pack
