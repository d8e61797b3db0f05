"""The exceptions that cross layers: raised in one package, caught in another.

``UserError`` is the only kind that reaches the user, as one line naming the problem and
the fix (cli.py prints it and exits with ``exit_code``). The others say how a run
stopped: the loop raises them, checkpoints and the sweep catch them, run.json records
their ``status``.
"""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""

    exit_code = 2  # a stop the user asked for says 130, as a shell does


class TrainingStopped(UserError):
    """The run stopped early (interrupt, NaN loss); ``status`` goes into run.json."""

    def __init__(self, message: str, status: str):
        super().__init__(message)
        self.status = status
        self.exit_code = 130 if status == "interrupted" else 2


class NonFiniteState(UserError):
    """The training state holds nan/inf: it is never written as a checkpoint."""
    status = "stopped-nan"  # what run.json says


class Interrupted(Exception):
    """A stop the user asked for (the signal's name in ``args[0]``), inside a step."""


class InputLost(Exception):
    """An input file read during training (an encoded-data cache file, an image cropped
    per draw) is gone or damaged (``args[0]``: which, and why; ``args[1]``, if given: what
    to do before resuming): the step is not taken."""


class PeerLost(Exception):
    """Another process of a multi-process run is gone (killed, crashed): a collective
    failed (``args[0]``: which process, as far as this one can tell)."""


class NonFiniteLoss(Exception):
    """A step's loss was nan or inf (the value in ``args[0]``): the step is not taken."""
