"""What a run keeps on disk, and how it is kept safe: the run folder's layout
(``layout``), all-or-nothing writes (``atomic``), the output lock (``lock``), checkpoints
(``checkpoint``) and their verification (``verify``), leftovers of killed writes
(``tidy``), output paths of the LoRA commands (``outputs``) and the cache folder
(``cache``). Pure Python at import: the command line checks paths before torch loads.
"""
