"""Issue 25's GPU check: task-free detection on CUDA, against the same run on the CPU.

A plain loop (no Trainer) with :class:`~lightning_metagrad.MetaGrad` and ``AutoBoundaries``
(the default ``"novelty+direction"`` and ``"novelty+direction+inputs"``): the detectors, the
training loss that confirms the direction's switches, the data-reading layers' novelty (found
by forward hooks), the traced onset and the late-update undo (its parameter copies on the
GPU). Permuted scikit-learn digits, 3 tasks of 200 steps, an MLP 64-256-256-10 with Adam
(update mode) and with SGD. The same seeds run on ``cpu`` and on ``cuda``;
the script reports, per device, the detected steps, the signal that fired, the onsets, where
the undo's copies live, the accuracy matrix and the time per step. Run it on a GPU machine:

    PYTHONPATH=. python3 experiments/gpu_detection_check.py --output gpu-detection.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_metagrad import AutoBoundaries, MetaGrad

TASKS, STEPS, BATCH = 3, 200, 32


def run(device: str, signal: str = "novelty+direction+inputs", sgd: bool = False) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    xs, ys = load_digits(return_X_y=True)
    x_all = torch.tensor(xs / 16.0, dtype=torch.float32)
    y_all = torch.tensor(ys)
    perms = [torch.arange(64)] + [torch.randperm(64, generator=gen) for _ in range(TASKS - 1)]
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    ).to(device)
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.05)
        if sgd
        else torch.optim.Adam(model.parameters(), lr=1e-3)
    )
    source = AutoBoundaries(signal=signal)  # type: ignore[arg-type]
    core = MetaGrad(boundaries=source)
    core.bind(model)
    core.use_optimizer(opt)
    detected: list[int] = []
    onsets: list[int] = []
    copies_on: set[str] = set()
    start = time.perf_counter()
    for step in range(TASKS * STEPS):
        task = step // STEPS
        idx = torch.randint(0, len(x_all), (BATCH,), generator=gen)
        x = x_all[idx][:, perms[task]].to(device)
        y = y_all[idx].to(device)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        core.before_optimizer_step()
        opt.step()
        core.observe_loss(loss.detach())  # the direction's switches are confirmed by it
        if core.switch_pending:
            detected.append(step)
            onsets.append(core._switch_onset)
            copies_on.update(str(p.device) for snap in core._history or [] for p in snap.values())
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        acc = [
            float((model(x_all[:, p].to(device)).argmax(1).cpu() == y_all).float().mean())
            for p in perms
        ]
    return {
        "device": device,
        "signal": signal,
        "optimizer": "sgd" if sgd else "adam",
        "detected": detected,
        "fired_by": list(source.detector.switch_signals),
        "onsets": onsets,
        "input_layers": sorted(getattr(source.signals.get("inputs"), "layers", None) or []),
        "undo_copies_on": sorted(copies_on),
        "tasks_started": core.task_index,
        "final_accuracy_per_task": acc,
        "ms_per_step": 1000 * seconds / (TASKS * STEPS),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default="gpu-detection.json")
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    results = []
    for signal in ("novelty+direction", "novelty+direction+inputs"):
        for sgd in (False, True):
            for device in devices:
                results.append(run(device, signal, sgd))
                if device == "cuda":
                    results[-1]["gpu"] = torch.cuda.get_device_name()
    for r in results:
        print(json.dumps(r))
    with open(args.output, "w") as f:
        json.dump({"true_switches": [STEPS * t for t in range(1, TASKS)], "runs": results}, f)


if __name__ == "__main__":
    main()
