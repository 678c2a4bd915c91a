"""Data: visual sentences from built-in generators, image folders, videos and tar shards, for both training stages."""

from datamodules.sentences import VisualSentence, VisualSentenceDataModule
from datamodules.sources import BuiltinSource, FolderSource, SentenceSource, TarSource, VideoSource

__all__ = [
    "BuiltinSource",
    "FolderSource",
    "SentenceSource",
    "TarSource",
    "VideoSource",
    "VisualSentence",
    "VisualSentenceDataModule",
]
