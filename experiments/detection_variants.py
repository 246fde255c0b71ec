"""Many task-switch detectors on one training run (docs/detection.md, "Blurry switches").

The callback's own ``task_boundaries`` (the library default of ``"auto"`` unless
``--drive`` names another variant) drives training; every variant is an
:class:`~lightning_metagrad.boundaries.auto.AutoBoundaries` fed the same gradients (and loss)
step by step, restarted at its own detections. So one run compares many detectors on
identical gradients. After a variant detects a switch at another step than the driver, the
training it sees is the driver's, which differs slightly from what its own boundaries would
give: use it to choose, then measure the choice with ``detection_eval.py``.

Variants (``--variants``):

* ``default``: ``AutoBoundaries()`` as built today;
* ``old``: the default of the study, pinned (novelty ``energy=0.95, lag=2``);
* ``nov-l<L>e<E>``: the default with ``SubspaceNovelty(lag=L, energy=E)``;
* ``dir-j<J>``: the direction's detector with a ``1 + J``-fold jump (``2J + 1`` fast);
* ``joint<N>``: :class:`JointEither`, the default's detectors plus a joint rule;
* ``nojoint``: the default without its joint rule (the default of stop 31);
* ``jn<N>``: the default with ``JointRule(need=N)``;
* ``jz<Z>``: the default with ``JointRule(each_threshold=Z)``;
* ``mw<M>`` / ``jn<N>mw<M>``: the default (or ``jn<N>``) whose detectors' adaptive warm-up
  reaches up to ``M`` observations after a (re)start instead of 100;
* ``nospike``: the default without the quiet after a transient loss spike (``spike=None``);
* ``jointg<N>r<R>``: ``joint<N>`` whose joint rule's switches also need the training loss's
  median over the joint run to be ``R`` times its median over the 15 steps before;
* ``dirhl<H>``: the default with ``DirectionSignal(halflife=H, recent=8, normalise=True)``
  (the task's mean direction forgets with a half-life of ``H`` steps instead of 100);
* ``dirc<C>`` / ``allc<C>``: the default with ``min_contrast=C`` on the direction's detector
  (or on both): a switch only if the jump is abrupt, not a ramp;
* ``gate<R>`` / ``allgate<R>``: the default with ``confirm={"loss": R}`` on the direction's
  detector (or on both): a switch only if the training loss since its onset is at least ``R``
  times the loss before;
* ``novgate<R>``: the default with ``confirm={"loss": R}`` on the novelty's detector (the
  direction's keeps 0.9);
* ``first-l<L>e<E>``: :class:`FirstLayer`, the novelty alone (``SubspaceNovelty(lag=L,
  energy=E)``) of the layer that reads the data (``net.0``), whose input the training does
  not change; ``default|first-l<L>e<E>`` in the output is either of the two, offline.

    python experiments/detection_variants.py rotated,500,blurry,0 fashion,800,event:batch_size,1 \\
        --variants old default nov-l4e0.98 joint1 --output runs/detection/variants
    python experiments/detection_variants.py --ratios runs/detection/variants/*.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
import detection_eval as de

from lightning_metagrad import AutoBoundaries, MetaGradCallback
from lightning_metagrad.benchmark.quiet import silence_lightning
from lightning_metagrad.boundaries import ChangePointDetector, default_detector
from lightning_metagrad.boundaries.either import EitherDetector
from lightning_metagrad.boundaries.joint import JointRule
from lightning_metagrad.boundaries.novelty import SubspaceNovelty
from lightning_metagrad.boundaries.signals import DirectionSignal


class JointEither(EitherDetector):
    """The either detector plus a joint rule: a switch also when the detectors' jumps,
    each in units of its own threshold, ``sum_k log(1 + jump_k) / log(1 + min_jump_k)``, reach
    ``need`` with a Stouffer z above 4, for ``patience`` observations in a row."""

    def __init__(
        self,
        detectors: list[ChangePointDetector],
        need: float = 1.0,
        patience: int = 8,
        loss_ratio: float | None = None,
    ):
        super().__init__(detectors)
        self.need, self.joint_patience, self._joint_run = need, patience, 0
        self.loss_ratio, self._losses = loss_ratio, []  # the joint rule's loss gate

    def _loss_confirms(self) -> bool:
        """The training loss's median over the joint run against the 15 steps before it."""
        since, gap, window = self.joint_patience + 7, 7, 15
        if self.loss_ratio is None or len(self._losses) < since + gap + 3:
            return True
        before = self._losses[-(since + gap + window) : -(since + gap)]
        ratio = statistics.median(self._losses[-since:]) / statistics.median(before)
        return ratio >= self.loss_ratio

    def update(self, **signals: Any) -> bool:
        if "loss" in signals and math.isfinite(float(signals["loss"])):
            self._losses = [*self._losses, float(signals["loss"])][-60:]
        if super().update(**signals):
            self._joint_run = 0
            return True
        if any(d.last_statistic == 0.0 for d in self.detectors):  # a warm-up
            self._joint_run = 0
            return False
        units = [
            max(math.log1p(max(d.last_relative_jump, 0.0)), 0.0) / math.log1p(d.min_relative_jump)
            for d in self.detectors
        ]
        z = sum(d.last_statistic for d in self.detectors) / math.sqrt(len(self.detectors))
        self._joint_run = self._joint_run + 1 if sum(units) >= self.need and z > 4.0 else 0
        if self._joint_run < self.joint_patience or not self._loss_confirms():
            return False
        self._joint_run = 0
        self.num_switches += 1
        self.switch_steps.append(self.num_observations - 1)
        self.last_onset = self.joint_patience + 7
        self.switch_signals.append("joint")
        for d in self.detectors:
            d.restart()
        return True


class FirstLayer(AutoBoundaries):
    """An :class:`AutoBoundaries` fed only the gradients of the layer that reads the data."""

    def on_gradients(self, names, thetas, targets):  # type: ignore[no-untyped-def]
        keep = [i for i, n in enumerate(names) if n.startswith("net.0.")]
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        return super().on_gradients(pick(names), pick(thetas), pick(targets))


def either_offline(a: list[int], b: list[int], gap: int = 30) -> list[int]:
    """The detections of either of two detectors, one per switch (within ``gap`` steps)."""
    out: list[int] = []
    for s in sorted(a + b):
        if not out or s - out[-1] > gap:
            out.append(s)
    return out


def source(name: str) -> AutoBoundaries:
    if name.startswith("first-l"):
        lag, energy = name[len("first-l") :].split("e")
        return FirstLayer(
            signal="novelty", novelty=SubspaceNovelty(lag=int(lag), energy=float(energy))
        )
    return AutoBoundaries(**variant(name))


def rebuilt(d: ChangePointDetector, **changes: Any) -> ChangePointDetector:
    """A fresh detector with ``d``'s arguments, ``changes`` replacing some."""
    kwargs: dict[str, Any] = {
        k: getattr(d, k)
        for k in ("signal", "weights", "threshold", "window", "patience", "warmup", "cooldown",
                  "min_relative_jump", "halflife", "max_warmup", "fast_jump", "min_contrast",
                  "trace_onset", "confirm", "spike")
    }  # fmt: skip
    kwargs.update(fast_window=d._fast_window, fast_patience=d._fast_patience, **changes)
    return ChangePointDetector(**kwargs)


def with_joint_rule(detector_changes: dict[str, Any] | None = None, **rule: Any) -> dict[str, Any]:
    """The default's either detector with its joint rule rebuilt with ``rule`` changed (and
    each detector with ``detector_changes``)."""
    either = default_detector("novelty+direction")
    assert isinstance(either, EitherDetector) and either.joint is not None
    joint = either.joint
    kwargs: dict[str, Any] = {"confirm": joint.confirm, "spike": joint.spike}
    kwargs.update({"need": joint.need, "each_threshold": joint.each_threshold, **rule})
    detectors = [rebuilt(d, **(detector_changes or {})) for d in either.detectors]
    return {"detector": EitherDetector(detectors, joint=JointRule(**kwargs))}


def variant(name: str) -> dict[str, Any]:
    """The :class:`AutoBoundaries` arguments of a variant (fresh objects at every call)."""
    if name == "default":
        return {}
    if name == "old":
        return {"novelty": SubspaceNovelty(energy=0.95, lag=2)}
    if name.startswith("nov-l"):
        lag, energy = name[len("nov-l") :].split("e")
        return {"novelty": SubspaceNovelty(lag=int(lag), energy=float(energy))}
    if name.startswith(("dirc", "allc")):
        contrast = float(name[4:])
        either = default_detector("novelty+direction")
        changed = either.detectors if name.startswith("allc") else either.detectors[1:]
        return {
            "detector": EitherDetector(
                [rebuilt(d, min_contrast=contrast) if d in changed else d for d in either.detectors]
            )
        }
    if name.startswith(("gate", "allgate")):  # the loss must confirm (ratio R)
        ratio = float(name.split("gate")[1])
        either = default_detector("novelty+direction")
        changed = either.detectors if name.startswith("all") else either.detectors[1:]
        return {
            "detector": EitherDetector(
                [
                    rebuilt(d, confirm={"loss": ratio}) if d in changed else d
                    for d in either.detectors
                ]
            )
        }
    if name.startswith("novgate"):  # the novelty's switches need the loss to rise R-fold
        ratio = float(name[len("novgate") :])
        novelty, direction = default_detector("novelty+direction").detectors
        return {"detector": EitherDetector([rebuilt(novelty, confirm={"loss": ratio}), direction])}
    if name.startswith("dirhl"):
        halflife = float(name[len("dirhl") :])
        return {"direction": DirectionSignal(halflife=halflife, recent=8, normalise=True)}
    if name.startswith("dir-j"):
        jump = float(name[len("dir-j") :])
        novelty, direction = default_detector("novelty+direction").detectors
        direction = rebuilt(direction, min_relative_jump=jump, fast_jump=2 * jump + 1)
        return {"detector": EitherDetector([novelty, direction])}
    if "mw" in name:  # [jn<N>]mw<M>: the detectors' warm-up extended up to M observations
        need, most = name.split("mw")
        rule = {"need": float(need[2:])} if need.startswith("jn") else {}
        return with_joint_rule(detector_changes={"max_warmup": int(most)}, **rule)
    if name.startswith("jn"):  # jn<N>: the library's joint rule with need N
        return with_joint_rule(need=float(name[2:]))
    if name.startswith("jz"):  # jz<Z>: the joint rule needs every detector's z above Z
        return with_joint_rule(each_threshold=float(name[2:]))
    if name == "nospike":  # the default without the spike's quiet (detectors and joint rule)
        return with_joint_rule(spike=None, detector_changes={"spike": None})
    if name == "nojoint":  # the default without its joint rule (as at stop 31)
        return {"detector": EitherDetector(default_detector("novelty+direction").detectors)}
    if name.startswith("jointg"):  # jointg<N>r<R>: the joint rule needs the loss to rise R-fold
        need, ratio = name[len("jointg") :].split("r")
        either = default_detector("novelty+direction")
        return {
            "detector": JointEither(either.detectors, need=float(need), loss_ratio=float(ratio))
        }
    if name.startswith("joint"):
        either = default_detector("novelty+direction")
        return {"detector": JointEither(either.detectors, need=float(name[5:] or 1))}
    raise ValueError(f"unknown variant {name!r}")


class WithVariants(AutoBoundaries):
    """The driving source (built from ``drive``'s arguments), which also feeds every variant
    and restarts it at its detections."""

    def __init__(self, drive: dict[str, Any], variants: dict[str, AutoBoundaries]) -> None:
        super().__init__(**drive)
        self.variants = variants
        self.found: dict[str, list[int]] = {k: [] for k in variants}
        self.onsets: dict[str, list[int]] = {k: [] for k in variants}
        self.losses: list[float] = []  # the training loss of every step, in order
        self._restart: set[str] = set()

    @property
    def uses_loss(self) -> bool:
        return True  # the loss of every step is recorded

    def on_gradients(self, names, thetas, targets):  # type: ignore[no-untyped-def]
        step = self.steps
        for key, source in self.variants.items():
            if key in self._restart:
                source.on_task_start()
                self._restart.discard(key)
            if source.on_gradients(names, thetas, targets):
                self.found[key].append(step)
                self.onsets[key].append(source.onset_steps())
                self._restart.add(key)
        return super().on_gradients(names, thetas, targets)

    def on_loss(self, loss):  # type: ignore[no-untyped-def]
        super().on_loss(loss)  # feeds only the signals that read the loss
        self.losses.append(float(loss))
        for source in self.variants.values():
            source.on_loss(loss)


def run(spec: str, names: list[str], drive: str, root: str, lr: float = 0.03) -> dict[str, Any]:
    """``spec``: ``stream,steps,kind,seed`` with kind ``abrupt``, ``blurry`` or
    ``event:<name>`` (one task of ``steps`` steps with that within-task event)."""
    stream_name, steps, kind, seed = spec.split(",")
    per_task = int(steps)
    stream, batches, schedule = de.silent_run(stream_name, kind, per_task, int(seed), root)
    events = kind.startswith("event:")
    true = [] if events else [per_task * i for i in range(1, 4)]
    blur = de.blur_of(per_task) if kind == "blurry" else 0
    model = de.model_for(stream, lr, schedule, len(batches))
    driver = WithVariants(variant(drive), {n: source(n) for n in names})
    cb = MetaGradCallback(task_boundaries=driver)
    pl.Trainer(max_steps=len(batches), callbacks=[cb], **de.TRAINER).fit(
        model, DataLoader(batches, batch_size=None)
    )
    found = {"driver": list(cb.detected_switches), **driver.found}
    for n in names:
        if n.startswith("first-") and "default" in found:
            found[f"default|{n}"] = either_offline(found["default"], found[n])
    return {
        "spec": spec, "drive": drive, "optimizer": de.OPTIMIZER, "lr": lr, "found": found,
        "onsets": driver.onsets, "losses": driver.losses,
        "score": {k: de.score(v, true, blur, per_task) for k, v in found.items()},
    }  # fmt: skip


def loss_ratios(paths: list[Path], before: int = 16) -> None:
    """Print, per detection of each saved run, whether it was true and the training loss's
    median since the detector's onset over its median in the ``before`` steps before it
    (docs/detection.md, "Adam, the traced onset and the loss's confirmation")."""
    for path in paths:
        result = json.loads(path.read_text())
        _, steps, kind, _ = result["spec"].split(",")
        per_task, losses = int(steps), result["losses"]
        true = [] if kind.startswith("event:") else [per_task * i for i in range(1, 4)]
        blur = de.blur_of(per_task) if kind == "blurry" else 0
        for name, found in result["found"].items():
            if name not in result.get("onsets", {}):
                continue
            used: set[int] = set()  # the matching of de.score
            for t in true:
                hits = [s for s in found if t - blur // 2 - 10 <= s <= t + min(per_task // 2, 250)]
                hits = [s for s in hits if s not in used]
                if hits:
                    used.add(hits[0])
            for step, onset in zip(found, result["onsets"][name]):
                start = max(step - max(onset, 4), 0)
                after, prior = losses[start:step], losses[max(start - before, 0) : start]
                if after and prior:
                    ratio = statistics.median(after) / statistics.median(prior)
                    print(name, result["spec"], step, "true" if step in used else "false",
                          f"{ratio:.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("specs", nargs="*", help="stream,steps,kind,seed")
    parser.add_argument("--ratios", nargs="+", type=Path, help="saved runs: the loss ratios")
    parser.add_argument("--variants", nargs="+", default=["old", "default"])
    parser.add_argument("--drive", default="default")
    de.add_training_options(parser, "runs/detection/variants")
    args = parser.parse_args()
    if args.ratios:
        loss_ratios(args.ratios)
        return
    de.OPTIMIZER = args.optimizer
    silence_lightning()
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning_metagrad")
    torch.set_num_threads(1)
    args.output.mkdir(parents=True, exist_ok=True)
    for spec in args.specs:
        path = args.output / (spec.replace(",", "-").replace(":", "_") + ".json")
        if path.exists():
            continue
        result = run(spec, args.variants, args.drive, args.root, args.lr)
        path.write_text(json.dumps(result, indent=1))
        counts = {k: (len(s["delays"]), s["false"]) for k, s in result["score"].items()}
        print(spec, "found, false:", counts, flush=True)


if __name__ == "__main__":
    main()
