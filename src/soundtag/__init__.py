"""soundtag: AudioSet sound-event tagging with PANNs CNN14 on LiteRT, fed by a numpy log-mel."""

from .audio import AudioError, AudioStream, load_audio
from .features import logmel
from .labels import labels
from .model import Cnn14Model, ModelError
from .tagger import Category, Event, Tagger, TaggerOptions, TagResult, WindowResult

__all__ = [
    "AudioError",
    "AudioStream",
    "Category",
    "Cnn14Model",
    "Event",
    "ModelError",
    "Tagger",
    "TaggerOptions",
    "TagResult",
    "WindowResult",
    "labels",
    "load_audio",
    "logmel",
]
__version__ = "0.1.0"
