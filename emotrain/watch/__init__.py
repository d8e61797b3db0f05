"""Watching a run: the progress bar, validation loss, sample images, logs and trackers,
and the report page (one run, a sweep's runs, or several overlaid).

Nothing here is imported at package load: the pure-Python parts (prompt files, the
schedule, the option checks) are read by the command line before torch is imported; the
rest is imported by the training loop and the ``report``/``sweep`` commands where they
need it.
"""
