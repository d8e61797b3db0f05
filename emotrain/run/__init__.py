"""One training run: the loop (``loop``), the batch order (``batches``), stop requests
(``signals``), which process this is and what processes share (``processes``), and the
run's record, run.json (``record``). Nothing is imported at package load: the command
line asks ``processes`` which process it is before torch is imported.
"""
