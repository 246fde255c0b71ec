"""Prototype of SubspacePredictor(normalize_steps=True), now the default: each step's gradient
scaled to unit energy per matrix before it enters the second moment (late, small gradients
count as much as early, large ones). The validation runs of docs/science.md used it.

Usage: python experiments/prototypes/stepnorm.py PRESET STREAM SPLIT OUT.json NAME=KWARGS...
e.g.   python experiments/prototypes/stepnorm.py fig1 rotated val runs/sn.json "sn97="
(with today's package the shipped normalisation sees unit-energy steps: a no-op)
"""
import sys, json, dataclasses, torch
from lightning_metagrad import MetaGradCallback, SubspacePredictor
from lightning_metagrad.benchmark.config import PRESETS
from lightning_metagrad.benchmark.runner import run_method, summarise

class StepNorm(SubspacePredictor):
    def observe(self, names, thetas, targets, finite=None):
        by = dict(zip(names, targets))
        scaled = {}
        for g in self._groups.values():
            w = by.get(g.weight)
            if w is None: continue
            b = by.get(g.bias) if g.bias else None
            n = w.float().pow(2).sum() + (0 if b is None else b.float().pow(2).sum())
            s = n.clamp_min(1e-30).rsqrt()
            scaled[g.weight] = w * s
            if b is not None: scaled[g.bias] = b * s
        return super().observe(names, thetas, [scaled.get(n, t) for n, t in zip(names, targets)], finite)

preset, stream, split, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
config = dataclasses.replace(PRESETS[preset], stream=stream, eval_split=split, seeds=(0,))
res = {}
for spec in sys.argv[5:]:
    name, _, args = spec.partition("=")
    holder = []
    def factory():
        kw = eval(f"dict({args})")
        holder.append(MetaGradCallback(predictor=StepNorm(**kw))); return holder
    r = run_method(config, name, 0, callbacks=factory)
    dims = holder[0].predictor.subspace_dims()
    s = summarise([r]); m = s["acc_matrix"]
    res[name] = {"spec": spec, "acc": s["acc"], "bwt": s["bwt"], "dims": dims, "acc_matrix": m}
    print(stream, name, "ACC %.3f BWT %.3f diag %.3f" % (s["acc"], s["bwt"], sum(m[i][i] for i in range(len(m)))/len(m)), dims, flush=True)
    json.dump({"config": dataclasses.asdict(config), "methods": res}, open(out, "w"), indent=1, default=str)
