"""soundtag: AudioSet sound-event tagging with the PANNs family (CNN14 and its siblings) on LiteRT, fed by a
numpy log-mel; every model file carries its spec (soundtag.spec)."""

from .audio import AudioStream, load_audio
from .errors import (
    AudioError,
    FetchError,
    InferenceError,
    ModelError,
    ModelNotFoundError,
    OptionsError,
    OutputError,
    SoundtagError,
    TooLongError,
    UnknownClassError,
)
from .features import logmel
from .labels import labels
from .model import Cnn14Model, Model
from .spec import FrontEnd, ModelSpec
from .results import Category, Event, TagResult, WindowResult
from .tagger import Tagger, TaggerOptions

__all__ = [
    "AudioError",
    "AudioStream",
    "Category",
    "Cnn14Model",
    "FrontEnd",
    "Model",
    "ModelSpec",
    "Event",
    "FetchError",
    "InferenceError",
    "ModelError",
    "ModelNotFoundError",
    "OptionsError",
    "OutputError",
    "SoundtagError",
    "Tagger",
    "TaggerOptions",
    "TagResult",
    "TooLongError",
    "UnknownClassError",
    "WindowResult",
    "labels",
    "load_audio",
    "logmel",
]
__version__ = "0.1.0"
