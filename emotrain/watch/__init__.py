"""Watching a run: validation loss, sample images, logs, the report and the sweep.

Nothing here is imported at package load: the pure-Python parts (prompt files, the
schedule) are read by the command line before torch is imported; the rest is imported
by the training loop and the ``report``/``sweep`` commands where they need it.
"""
