"""The LoRA as a concept: what an adapter is, how it gets into a model and out again,
how it is written to and read from files, and how several are stacked.

- ``kinds``: the registry of adapter kinds (today ``lora``): per kind, its injection,
  its tensor names (live model, kohya/LyCORIS file, diffusers file), its delta, its size.
- ``inject``: the peft config a run asks for or a file reproduces; injection; SDXL with
  an adapter on the meta device or with random weights.
- ``fast``: the ``lora`` kind's forward under mixed precision: one autograd function per
  layer in the autocast dtype, fewer operations than peft's; fp32 runs keep peft's.
- ``dropout``: sd-scripts' network, rank and module dropout on training micro-batches,
  drawn from the run's generator; ``maxnorm``: sd-scripts' max-norm of each delta.
- ``live``: reading a model's adapter out (saving) and putting a file's in (continuing).
- ``weights``: ``LoraWeights``, the one shape every LoRA takes between a file and a model.
- ``formats``: the file formats (kohya, diffusers), one registry for save, load,
  ``convert`` and ``merge --to``.
- ``stacking``: the arithmetic: baking into base weights, combining exactly or by SVD.

Only this package knows peft's tensor names. Nothing is imported at package load:
``formats`` keeps its registry's names importable without torch for the command line.
"""
