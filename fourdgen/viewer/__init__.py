"""``fourdgen view``: 4D scenes in the browser (viser), from a stage-3 checkpoint, per-frame PLYs or
a scene folder. :mod:`.sources` gives a scene's frames at a time, :mod:`.server` serves them,
:mod:`.flythrough` renders the camera path to mp4. What a path is, and the console command, live in
:mod:`fourdgen.view` above the stages (a checkpoint is rebuilt as the stage-3 fitter); the live view
of a running fit is :class:`fourdgen.callbacks.viewer.LiveViewer`.
"""

from fourdgen.viewer.cameras import ViewCameras, ViewerInputError
from fourdgen.viewer.server import ViewerApp
from fourdgen.viewer.sources import FitterSource, Frame, PlyFolderSource, SceneFolderSource, Source

__all__ = [
    "FitterSource",
    "Frame",
    "PlyFolderSource",
    "SceneFolderSource",
    "Source",
    "ViewCameras",
    "ViewerApp",
    "ViewerInputError",
]
