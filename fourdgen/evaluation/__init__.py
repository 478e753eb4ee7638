"""Evaluation protocols of the papers' tables: readers of the benchmarks' ground-truth files,
per-dataset protocols on top of :mod:`fourdgen.metrics`, and ``fourdgen eval`` (:mod:`.command`).
Sits above ``metrics``, ``data``, ``geometry`` and ``importers`` (DyCheck's split reader); nothing
below imports it."""
