"""Importers: datasets in their own layouts -> fourdgen scenes (:mod:`fourdgen.data.scene`).

One module per format, each with ``import_scene(src, dst, **options) -> [scene folders]`` and
``add_arguments(parser)`` for its own options; :mod:`fourdgen.importers.command` is
``fourdgen import <format> <src> <dst>``. Importers sit above ``data`` and ``geometry``; nothing
below imports them.
"""

FORMATS = {
    "nerfstudio": "fourdgen.importers.nerfstudio",  # also instant-ngp and D-NeRF transforms files
    "colmap": "fourdgen.importers.colmap",
    "n3dv": "fourdgen.importers.n3dv",
    "dycheck": "fourdgen.importers.dycheck",
}
