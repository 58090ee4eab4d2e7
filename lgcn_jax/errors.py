"""The errors about a user's files: each message names the file and the fix."""

from __future__ import annotations

__all__ = ["CheckpointError", "ShapeModelError", "DatasetError", "ImageError", "VideoError"]


class CheckpointError(RuntimeError):
    """A workdir, checkpoint or release folder that is missing, corrupt or of another network."""


class ShapeModelError(RuntimeError):
    """A shape model file is missing, corrupt or does not fit the network."""


class DatasetError(RuntimeError):
    """A dataset could not be found or read."""


class ImageError(ValueError):
    """An image cannot be read or used."""


class VideoError(RuntimeError):
    """A video that cannot be opened or ends early."""
