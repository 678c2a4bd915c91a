"""Sentence sources: built-in (synthetic + shipped photos), image folders, videos."""

from datamodules.sources.base import SentenceSource, VisualSentence
from datamodules.sources.builtin import BuiltinSource
from datamodules.sources.folder import FolderSource
from datamodules.sources.video import VideoSource

__all__ = ["BuiltinSource", "FolderSource", "SentenceSource", "VideoSource", "VisualSentence"]
