"""Data: visual sentences from built-in generators, image folders and videos, for both training stages."""

from datamodules.sentences import VisualSentence, VisualSentenceDataModule
from datamodules.sources import BuiltinSource, FolderSource, SentenceSource, VideoSource

__all__ = [
    "BuiltinSource",
    "FolderSource",
    "SentenceSource",
    "VideoSource",
    "VisualSentence",
    "VisualSentenceDataModule",
]
