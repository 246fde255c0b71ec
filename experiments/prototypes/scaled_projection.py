"""Prototype (not shipped): the default's gradient bases with SGP's importance scaling (Saha &
Roy, AAAI 2023): G <- G - (G M) diag(lam) M^T, lam_i = (a+1) s_i / (a s_i + max s) from each
direction's energy s_i^2 in the finished task (the max over tasks). Measured in
docs/results.md (README main job section).

Usage: python experiments/prototypes/scaled_projection.py PRESET SPLIT OUT.json OVERRIDES NAME=KWARGS...
e.g.   python experiments/prototypes/scaled_projection.py digits val runs/sgp.json '{"seeds": [0]}' \
           "a10=alpha=10.0" "a1=alpha=1.0"
"""
import sys, json, dataclasses, torch
from lightning_metagrad import MetaGradCallback, SubspacePredictor
from lightning_metagrad.predictors.basis import grow_basis
from lightning_metagrad.benchmark.config import PRESETS
from lightning_metagrad.benchmark.runner import run_method, summarise

class Scaled(SubspacePredictor):
    def __init__(self, alpha=10.0, threshold=0.97, **kw):
        super().__init__(threshold=threshold, **kw)
        self.alpha = alpha; self.m, self.lam = {}, {}
    @torch.no_grad()
    def end_task(self, names, thetas):
        for n, cov in self._cov.items():
            old = self.m.get(n)
            grown = grow_basis(old, cov, self.threshold_of(n))
            if grown is None: continue
            k_old = 0 if old is None else old.shape[1]
            e = torch.einsum("ck,cd,dk->k", grown, cov.to(grown), grown).clamp_min(0).sqrt()
            lam = (self.alpha + 1) * e / (self.alpha * e + e.max().clamp_min(1e-30))
            if k_old:
                lam[:k_old] = torch.maximum(lam[:k_old], self.lam[n])
            self.m[n], self.lam[n] = grown, lam
            self._basis[n] = grown
        self._cov, self._count, self._recent = {}, {}, []
        self._old_tasks += 1
    @torch.no_grad()
    def rewrite_(self, names, thetas, targets):
        removed, total = [], []
        for group, w, b in self._matrices(names, targets):
            n = group.weight
            if n not in self.m: continue
            m, lam = self.m[n], self.lam[n]
            G = torch.cat([w, b[:, None]], 1) if b is not None else w
            total.append(G.pow(2).sum())
            P = ((G @ m) * lam) @ m.T
            removed.append(P.pow(2).sum())
            G2 = G - P
            if b is not None: w.copy_(G2[:, :-1]); b.copy_(G2[:, -1])
            else: w.copy_(G2)
        if not removed: return {}
        return {"metagrad/removed_energy": torch.stack(removed).sum() / torch.stack(total).sum()}

preset, split, out = sys.argv[1], sys.argv[2], sys.argv[3]
overrides = json.loads(sys.argv[4])
variants = sys.argv[5:]
config = dataclasses.replace(PRESETS[preset], eval_split=split, **overrides)
results = {}
for spec in variants:
    name, _, args = spec.partition("=")
    kw = eval(f"dict({args})")
    runs = []
    for s in config.seeds:
        def factory():
            return [MetaGradCallback(predictor=Scaled(**kw))]
        r = run_method(config, name, s, callbacks=factory)
        runs.append(r)
    results[name] = summarise(runs)
    m = results[name]["acc_matrix"]
    print(name, "ACC %.3f BWT %.3f diag %.3f" % (results[name]["acc"], results[name]["bwt"], sum(m[i][i] for i in range(len(m)))/len(m)), flush=True)
    json.dump({"config": dataclasses.asdict(config), "methods": results}, open(out, "w"), indent=1, default=str)
