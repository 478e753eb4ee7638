"""``fourdgen generate``: the stages chained from one image or video to a 4D scene.

A pipeline file (``lightning_configs/pipelines/``, parsed by :mod:`~fourdgen.generate.spec`) lists
steps: tools (:mod:`~fourdgen.generate.tools`: input import, depth, target cameras) and
``predict``/``fit`` of recipes through the same LightningCLI as the command line
(:mod:`~fourdgen.generate.stages`); each step reads the folder an earlier one wrote.
:mod:`~fourdgen.generate.runner` checks everything first, then runs the steps with ``generate.json``
and ``--resume``. This package sits on top: nothing below it imports it.
"""
