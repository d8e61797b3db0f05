"""What the training loop calls to be watched: a handful of calls, each a line there.

``hold_out`` (the scanned data), ``prepare`` (while the VAE is loaded), ``reporting`` (the
report on every way out), ``begin`` (step 0), ``before_update`` (gradients ready) and
``after_step``. Validation (with --ema-decay: for the
raw and the EMA weights) and samples (--ema-for-eval: with the EMA weights swapped in)
run on the main process, inside ``training_rng_untouched``, and never see the loop's
noise generator; nothing here changes a gradient, a parameter or the data order.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

from ..disk.layout import SAMPLE_NAME, RunFolder, shown
from ..optimizers import evaluation_point
from .progress import SMOOTHING
from . import logs
from .prompts import sample_prompts
from .rng import training_rng_untouched
from .schedule import due, interval
from .validation import Validation, split_validation

NOT_LOGGED = ("step", "time")


class Watch:
    def __init__(self, cfg, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.folder = RunFolder(cfg.output)
        self.main = accelerator.is_main_process
        self.prompts = sample_prompts(cfg) if self.main else []
        self.val_every, self.sample_every = interval(cfg.val_every, cfg), interval(cfg.sample_every, cfg)
        self.validation, self._held_out, self.metrics, self.progress = None, [], None, None
        self.smoothed, self.train_time, self._lr, self._norm = None, 0.0, None, None
        self._group_lrs = {}
        self._log_next, self._last_log, self._mark = False, (0, 0.0), 0.0

    def hold_out(self, scanned):
        """The scanned training data, less the images ``--val-split`` holds out; the
        validation images are kept for ``prepare`` (``--val-data`` is scanned here)."""
        scanned, held_out = split_validation(self.cfg, scanned)
        self._held_out = held_out if self.main else []
        return scanned

    @property
    def keeps_encoders(self) -> bool:
        """Whether the VAE and text encoders must outlive the data's encoding."""
        return bool(self._held_out or self.prompts)

    def prepare(self, sdxl, data, progress) -> None:
        """Encode the validation images while the VAE is loaded; then free the VAE and
        frozen text encoders the loop does not need, or park them for the samples."""
        from .samples import long_prompts, park_frozen

        self.progress = progress
        if self.prompts and (warning := long_prompts(sdxl, self.prompts)):  # needs the tokenizer: known now
            progress.console.print(f"  warning: {warning}", markup=False, highlight=False)
        if self._held_out:
            with progress.task("encoding validation images", total=len(self._held_out)) as advance, \
                    training_rng_untouched():
                self.validation = Validation(self.cfg, sdxl, self._held_out, self.accelerator.device, advance)
        if self.keeps_encoders:
            park_frozen(sdxl, self.cfg, data, sampling=bool(self.prompts))

    def begin(self, run, resumed: bool) -> None:
        """Trackers and metrics.jsonl (cut back to the checkpoint when resuming); before
        training, the step-0 validation loss and samples."""
        if self.main:
            at = run.step if resumed else None
            self.metrics = logs.MetricsFile(self.folder.metrics, at)
            self._drop_samples_after(run.step if resumed else -1)  # an earlier attempt's: replaced, not mixed
            logs.start_trackers(self.accelerator, self.cfg, self.folder, at)
            self.smoothed = self.metrics.last.get("train/loss_smoothed")
            self.train_time = self.metrics.last.get("time", 0.0)
            if self.validation:
                run.info["validation"] = self.validation.description
            if self.prompts:
                run.info["sample_prompts"] = [p.to_dict() for p in self.prompts]
            if run.step == 0:
                what = " and ".join(w for w, on in (("validation", self.validation), ("samples", self.prompts)) if on)
                with self.progress.task(f"{what} before training") if what else nullcontext():
                    self._checkpoint_views(run, {"step": 0, "time": 0.0})
        self._last_log = (run.step, self.train_time)
        self._plan(run)

    def before_update(self, run, norm) -> None:
        """Gradients are final: note the lr this step uses and, on a logging step, the
        gradient norm before clipping (``norm``: what clipping returned, if it ran)."""
        groups = run.optimizer.optimizer.param_groups
        self._lr = groups[0]["lr"]
        self._group_lrs = {f"train/lr/{g.get('name', k)}": g["lr"] for k, g in enumerate(groups)} \
            if len({g["lr"] for g in groups}) > 1 else {}
        if self._log_next:
            self._norm = norm if norm is not None else logs.gradient_norm(run.named_params.values(),
                                                                           run.accelerator.scaler)

    def after_step(self, run, loss: float) -> None:
        now = time.perf_counter()
        self.train_time += now - self._mark
        if self.main:
            self.smoothed = loss if self.smoothed is None else SMOOTHING * self.smoothed + (1 - SMOOTHING) * loss
            record = {"step": run.step, "time": self.train_time, "train/loss": loss,
                      "train/loss_smoothed": self.smoothed, "train/lr": self._lr, **self._group_lrs,
                      **getattr(run, "scalars", {})}  # the step's own figures (max-norm)
            record.update(logs.optimizer_scalars(run.optimizer.optimizer, counted=self._log_next))
            record.update(logs.lr_free_scalars(run.optimizer.optimizer, self._lr))
            if self._log_next:
                steps, seconds = run.step - self._last_log[0], self.train_time - self._last_log[1]
                record["train/grad_norm"] = float(self._norm)
                record["perf/it_per_s"] = steps / seconds if seconds > 0 else None
                record.update(logs.memory_scalars(run.accelerator.device))
                self._last_log = (run.step, self.train_time)
            self._checkpoint_views(run, record)
        self._plan(run)

    @contextmanager
    def reporting(self, run):
        """Around the run: on every way out the logs are closed and report.html written
        (not after a second Ctrl-C, which means: stop now)."""
        try:
            yield
        except KeyboardInterrupt:
            self._close()
            raise
        except BaseException:
            self._close(report=True)
            raise
        self._close(report=True)

    def _close(self, report: bool = False) -> None:
        if not self.main or self.metrics is None:
            return
        self.metrics.close()
        logs.finish_trackers(self.accelerator)
        if report:
            from .report import write_report
            path = write_report([self.folder.root], self.folder.report)
            self.progress.console.print(f"report: {shown(path)}")  # to open from where the user is
        self.metrics = None

    # -- inside ------------------------------------------------------------------------
    def _plan(self, run) -> None:
        """Ask the optimizer to count its filter on the next step if that one is logged
        (every --log-every steps, and the last step)."""
        following = run.step + 1
        self._log_next = self.main and (following % self.cfg.log_every == 0 or following == self.cfg.steps)
        if self._log_next and hasattr(run.optimizer.optimizer, "count_filter_next_step"):
            run.optimizer.optimizer.count_filter_next_step()
        self._mark = time.perf_counter()

    def _checkpoint_views(self, run, record: dict) -> None:
        """Validation and samples when due; then the record goes out."""
        step, last = run.step, self.cfg.steps
        images = []
        # a schedule-free optimizer's evaluation weights, the training iterate back exactly after
        with training_rng_untouched(), evaluation_point(run.optimizer.optimizer):
            if self.validation and (step == 0 or due(step, self.val_every, last)):
                record["val/loss"] = self.validation.loss(run)
                if run.ema is not None:  # --ema-decay: the EMA's loss beside the raw weights'
                    with run.ema.swapped_in():
                        record["val/loss_ema"] = self.validation.loss(run)
            if self.prompts and (step == 0 or due(step, self.sample_every, last)):
                from .samples import generate
                with run.ema.swapped_in() if run.ema is not None and self.cfg.ema_for_eval else nullcontext():
                    images = generate(run, self.prompts, step, self.folder)
        self.metrics.write(record)
        self.accelerator.log({k: v for k, v in record.items() if k not in NOT_LOGGED and v is not None}, step=step)
        if images:
            logs.log_images(self.accelerator, {f"samples/{k:02d}": image for k, (_, image) in enumerate(images)}, step)

    def _drop_samples_after(self, step: int) -> None:
        """Samples an interrupted attempt made after the checkpoint: the resumed run
        makes its own."""
        if self.folder.samples.is_dir():
            for path in self.folder.samples.iterdir():
                match = SAMPLE_NAME.match(path.name)
                if match and int(match.group(1)) > step:
                    path.unlink()
