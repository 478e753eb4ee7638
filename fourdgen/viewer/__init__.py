"""``fourdgen view``: 4D scenes in the browser (viser), from a stage-3 checkpoint, per-frame PLYs or
a scene folder. :mod:`.load` finds what a path is, :mod:`.sources` gives its frames at a time,
:mod:`.server` serves them, :mod:`.flythrough` renders the camera path to mp4, :mod:`.command` is
the console command; the live view of a running fit is :class:`fourdgen.callbacks.viewer.LiveViewer`.

The checkpoint loader imports the stage-3 fitter when it is used: the stages sit above this package.
"""

from fourdgen.viewer.cameras import ViewCameras, ViewerInputError
from fourdgen.viewer.load import load_source
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
    "load_source",
]
