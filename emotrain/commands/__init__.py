"""The commands, one module each: what ``emotrain <command>`` does once the command line
(cli.py) is parsed. ``train`` (sdxl-lora), ``sweep``, ``vram``, ``lora`` (merge and
convert) and ``report``. Each imports torch only when it gets to work, so bad input is
answered before the heavy imports."""
