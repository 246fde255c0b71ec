"""Issue 24's GPU check, one short script for a lent GPU machine: the default's task-2 step on
the demo Transformer (14.6M parameters, batch 20 x 35 tokens, plain SGD as in the demo) on
CUDA.

* **Host syncs**: the engine's ``before_optimizer_step`` runs under
  ``torch.cuda.set_sync_debug_mode("error")`` (any synchronising op raises) and a dispatch mode
  that counts host reads of device values (``aten::_local_scalar_dense`` / ``item``).
* **Ratio**: a plain training step against the same step with the engine (task 2), on two
  copies of the model with the same weights, in interleaved rounds, each timed with
  ``torch.cuda.synchronize()`` around 5 steps; medians.

    PYTHONPATH=. python3 experiments/gpu_check.py --output gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lightning_metagrad import MetaGrad
from lightning_metagrad.meters import HostReads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default="gpu.json")
    parser.add_argument("--setup-steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--profile", action="store_true", help="profile 5 engine steps")
    args = parser.parse_args()
    from lightning.pytorch.demos import Transformer

    dev = torch.device("cuda")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randint(0, 33278, (20, 35), generator=gen).to(dev),
            torch.randint(0, 33278, (20, 35), generator=gen).to(dev),
        )
        for _ in range(8)
    ]
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def make() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = Transformer().to(dev)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, core: MetaGrad | None, i: int):
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            out = model(x, y)
            loss = torch.nn.functional.nll_loss(out.float(), y.reshape(-1))
        loss.backward()
        if core is not None:
            core.before_optimizer_step()
        opt.step()

    plain, plain_opt = make()
    model, opt = make()
    core = MetaGrad()
    core.bind(model)
    core.use_optimizer(opt)
    for i in range(args.setup_steps):  # task 1
        step(model, opt, core, i)
    core.start_task()
    dims = core.predictor.subspace_dims()  # type: ignore[attr-defined]

    # Host syncs in the engine's task-2 step.
    x, y = batches[0]
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.nll_loss(model(x, y), y.reshape(-1)).backward()
    torch.cuda.synchronize()
    sync_error = None
    reads = HostReads()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with reads:
            core.before_optimizer_step()
    except RuntimeError as err:  # a synchronising op
        sync_error = str(err)[:500]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    opt.step()

    for i in range(5):  # warm-up
        step(plain, plain_opt, None, i)
        step(model, opt, core, i)
    times: dict[str, list[float]] = {"plain": [], "metagrad": []}
    configs = {"plain": (plain, plain_opt, None), "metagrad": (model, opt, core)}
    for r in range(args.rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            m, o, c = configs[name]
            torch.cuda.synchronize()
            start = time.perf_counter()
            for i in range(5):
                step(m, o, c, i)
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / 5 * 1000)
    profile = None
    if args.profile:  # what the engine's step spends: launches and host time per op
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        for i in range(5):
            x, y = batches[i]
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.nll_loss(model(x, y), y.reshape(-1)).backward()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                start = time.perf_counter()
                core.before_optimizer_step()
                host_ms = (time.perf_counter() - start) * 1000
                torch.cuda.synchronize()
            opt.step()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if "CUDA" in str(getattr(e, "device_type", "")))
        table = events.table(sort_by="self_cpu_time_total", row_limit=15)
        profile = {"engine_host_ms_last": host_ms, "cuda_kernels_per_step": kernels}
        print(table)
    result = {
        "device": torch.cuda.get_device_name(),
        "profile": profile,
        "torch": torch.__version__,
        "precision": args.precision,
        "host_reads_in_engine_step": reads.count,
        "sync_debug_error": sync_error,
        "plain_ms_median": statistics.median(times["plain"]),
        "metagrad_task2_ms_median": statistics.median(times["metagrad"]),
        "ratio_median": statistics.median(times["metagrad"]) / statistics.median(times["plain"]),
        "ratio_mean": statistics.fmean(times["metagrad"]) / statistics.fmean(times["plain"]),
        "rounds": args.rounds,
        "protected_dims": {
            k: v for k, v in dims.items() if "embedding" in k or k == "decoder.weight"
        },
        "times_ms": times,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "times_ms"}, indent=1))
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
