"""Prototype (hypothesis check): the default plus, per Linear layer, the direction of the mean
layer input seen in the training forward passes (no extra pass), added to the basis at each
boundary. Tests whether the common-mode input component is what the gradient subspace misses.

Usage: python experiments/prototypes/mean_direction.py PRESET STREAM SPLIT OUT.json
e.g.   python experiments/prototypes/mean_direction.py fig1 split val runs/meandir-split.json
"""
import sys, json, dataclasses, torch
from torch import nn
from lightning_metagrad import MetaGradCallback, SubspacePredictor
from lightning_metagrad.predictors.basis import complement_of
from lightning_metagrad.benchmark.config import PRESETS
from lightning_metagrad.benchmark.runner import run_method, summarise

class MeanDir(SubspacePredictor):
    def __init__(self, **kw):
        super().__init__(**kw); self.sums = {}; self.hooked = False
    def hook(self, model):
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                w = name + ".weight"
                def f(mod, inp, out, w=w):
                    if not mod.training: return
                    x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
                    x = torch.cat([x, torch.ones(x.shape[0], 1)], 1) if mod.bias is not None else x
                    s, n = self.sums.get(w, (0, 0)); self.sums[w] = (s + x.sum(0), n + x.shape[0])
                m.register_forward_hook(f)
    @torch.no_grad()
    def end_task(self, names, thetas):
        super().end_task(names, thetas)
        for w, (s, n) in self.sums.items():
            if w not in self._basis: continue
            m = self.basis(w)
            mu = s / n; mu = mu / mu.norm()
            r = mu - m @ (m.T @ mu)
            if r.norm() > 1e-3:
                grown = torch.cat([m, (r / r.norm())[:, None]], 1)
                self._complement.discard(w)
                if grown.shape[1] > grown.shape[0] / 2:
                    self._complement.add(w); grown = complement_of(grown)
                self._basis[w] = grown
        self.sums = {}

class Hooking(MetaGradCallback):
    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if not self.predictor.hooked:
            self.predictor.hook(pl_module); self.predictor.hooked = True

preset, stream, split, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
config = dataclasses.replace(PRESETS[preset], stream=stream, eval_split=split, seeds=(0,))
holder = []
def factory():
    holder.append(Hooking(predictor=MeanDir())); return holder
r = run_method(config, "meandir", 0, callbacks=factory)
s = summarise([r]); m = s["acc_matrix"]
print(stream, "meandir ACC %.3f BWT %.3f" % (s["acc"], s["bwt"]), holder[0].predictor.subspace_dims(), flush=True)
json.dump({"config": dataclasses.asdict(config), "methods": {"meandir": s}}, open(out, "w"), indent=1, default=str)
