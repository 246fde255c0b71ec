"""Prototype (not shipped): two-sided protection, G <- G - Mo Mo^T G Mi Mi^T, with Mo / Mi the
old tasks' output-side / input-side gradient subspaces (exact second moments every 4th step).
It keeps the first-order condition delta_old^T dW x_old = 0 with more room than the default's
input-side projection. Measured in docs/results.md (README main job section).

Usage: python experiments/prototypes/two_sided.py PRESET SPLIT OUT.json SEEDS NAME=KWARGS...
e.g.   python experiments/prototypes/two_sided.py digits val runs/two-sided.json 0 "both97=" \
           "input97=sides='input'" "both99=out_threshold=0.99,in_threshold=0.99"
"""
import sys, json, torch
from lightning_metagrad import MetaGradCallback, SubspacePredictor
from lightning_metagrad.predictors.basis import grow_basis
from lightning_metagrad.benchmark.config import BenchmarkConfig, PRESETS
from lightning_metagrad.benchmark.runner import run_method, summarise

class Both(SubspacePredictor):
    def __init__(self, out_threshold=0.97, in_threshold=0.97, every=4, sides="both"):
        super().__init__(threshold=in_threshold, every=every, sample_rows=None)
        self.out_threshold = out_threshold; self.sides = sides
        self.ci, self.co, self.mi, self.mo = {}, {}, {}, {}
    def observe(self, names, thetas, targets, finite=None):
        step = self._steps; self._steps += 1
        if step % self.every: return {}
        for group, g in self._matrix_views(names, targets):
            n = group.weight
            self.ci[n] = self.ci.get(n, 0) + g.T @ g
            self.co[n] = self.co.get(n, 0) + g @ g.T
            self._count[n] = self._count.get(n, 0) + 1
        return {}
    def end_task(self, names, thetas):
        for n in self.ci:
            mi = grow_basis(self.mi.get(n), self.ci[n], self.threshold)
            mo = grow_basis(self.mo.get(n), self.co[n], self.out_threshold)
            if mi is not None: self.mi[n] = mi
            if mo is not None: self.mo[n] = mo
            self._basis[n] = self.mi[n]
        self.ci, self.co, self._count = {}, {}, {}
        self._old_tasks += 1
    def rewrite_(self, names, thetas, targets):
        removed, total = [], []
        for group, w, b in self._matrices(names, targets):
            n = group.weight
            if n not in self.mi: continue
            mi, mo = self.mi[n], self.mo[n]
            G = torch.cat([w, b[:, None]], 1) if b is not None else w
            tot = G.pow(2).sum()
            if self.sides == "both":
                P = mo @ ((mo.T @ G) @ mi) @ mi.T
            else:
                P = (G @ mi) @ mi.T
            G2 = G - P
            removed.append(P.pow(2).sum()); total.append(tot)
            if b is not None:
                w.copy_(G2[:, :-1]); b.copy_(G2[:, -1])
            else:
                w.copy_(G2)
        if not removed: return {}
        return {"metagrad/removed_energy": torch.stack(removed).sum() / torch.stack(total).sum()}
    def subspace_dims(self):
        return {n: self.mi[n].shape[1] for n in self.mi}
    def dims2(self):
        return {n: (self.mi[n].shape[1], self.mo[n].shape[1]) for n in self.mi}

preset, split, out = sys.argv[1], sys.argv[2], sys.argv[3]
seeds = [int(s) for s in sys.argv[4].split(",")]
variants = sys.argv[5:]
import dataclasses
config = dataclasses.replace(PRESETS[preset], eval_split=split, seeds=tuple(seeds))
results = {}
for spec in variants:
    name, _, args = spec.partition("=")
    kw = eval(f"dict({args})")
    runs = []
    for s in seeds:
        preds = []
        def factory():
            p = Both(**kw); preds.append(p); return [MetaGradCallback(predictor=p)]
        r = run_method(config, name, s, callbacks=factory)
        r["dims"] = {k: list(v) for k, v in preds[0].dims2().items()}
        runs.append(r)
        print(name, s, sum(r["acc_matrix"][-1])/len(r["acc_matrix"][-1]), r["dims"], flush=True)
    results[name] = summarise(runs)
    results[name]["dims"] = [r["dims"] for r in runs]
    print(name, "ACC", results[name]["acc"], "BWT", results[name]["bwt"], flush=True)
json.dump(results, open(out, "w"), indent=1, default=str)
