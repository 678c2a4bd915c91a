"""Sentence sources: built-in (synthetic + shipped photos), image folders, videos, tar shards (streamed)."""

from datamodules.sources.base import SentenceSource, VisualSentence
from datamodules.sources.builtin import BuiltinSource
from datamodules.sources.folder import FolderSource
from datamodules.sources.tar import TarSource
from datamodules.sources.video import VideoSource

__all__ = ["BuiltinSource", "FolderSource", "SentenceSource", "TarSource", "VideoSource", "VisualSentence"]
