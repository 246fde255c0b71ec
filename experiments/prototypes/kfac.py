"""Prototype: Kronecker-factored predictor of the old-task gradient, per Linear layer.
pred_l = mean_i G_i (W - W*_i) S_i (+ m_i), S = E[x x^T] (inputs with a 1 for the bias), G = E[g g^T]."""
import os, sys, time, json
import torch, torchvision
from torch import nn
torch.set_num_threads(2)
ds = torchvision.datasets.FashionMNIST(os.environ.get("DATA_ROOT", "../shared/data"), train=True)
dt = torchvision.datasets.FashionMNIST(os.environ.get("DATA_ROOT", "../shared/data"), train=False)
Xtr = ds.data.float().div(255).view(-1, 784); Ytr = ds.targets
Xte = dt.data.float().div(255).view(-1, 784); Yte = dt.targets
mu, sd = Xtr.mean(), Xtr.std(); Xtr = (Xtr - mu) / sd; Xte = (Xte - mu) / sd

def run(rule="sign", seed=0, lr=0.03, T=5, iters=2000, bs=64, tau=0.0, use_m=1, every=1, online=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    perms = [torch.arange(784)] + [torch.randperm(784, generator=g) for _ in range(T - 1)]
    torch.manual_seed(seed)
    lins = [nn.Linear(784,256), nn.Linear(256,256), nn.Linear(256,256), nn.Linear(256,10)]
    net = nn.Sequential(lins[0], nn.ReLU(), lins[1], nn.ReLU(), lins[2], nn.ReLU(), lins[3])
    acts = {}
    def fh(mod, inp, out): acts[mod] = inp[0].detach()
    def bh(mod, gin, gout): acts[(mod, "g")] = gout[0].detach()
    for l in lins: l.register_forward_hook(fh); l.register_full_backward_hook(bh)
    def Wfull(l): return torch.cat([l.weight.detach(), l.bias.detach()[:, None]], 1)  # out x (in+1)
    def acc(t):
        with torch.no_grad(): return (net(Xte[:, perms[t]]).argmax(1) == Yte).float().mean().item()
    old = []  # per task: list per layer of (G, S, Wstar, m)
    R = []; diag = []
    for t in range(T):
        S = [torch.zeros(l.in_features+1, l.in_features+1) for l in lins]
        G = [torch.zeros(l.out_features, l.out_features) for l in lins]
        M = [torch.zeros(l.out_features, l.in_features+1) for l in lins]
        n = 0; preds = None
        for it in range(iters):
            idx = torch.randint(0, 60000, (bs,), generator=g)
            x = Xtr[idx][:, perms[t]]; y = Ytr[idx]
            net.zero_grad(); nn.functional.cross_entropy(net(x), y).backward()
            grads = [torch.cat([l.weight.grad, l.bias.grad[:, None]], 1) for l in lins]
            for k, l in enumerate(lins):
                a = torch.cat([acts[l], torch.ones(bs, 1)], 1)
                gg = acts[(l, "g")] * bs  # per-example dL/dz
                S[k] += a.T @ a / bs; G[k] += gg.T @ gg / bs
                M[k].mul_(0.99).add_(grads[k], alpha=0.01)
            n += 1
            new = grads
            if t > 0:
                if preds is None or it % every == 0:
                    preds = []
                    for k, l in enumerate(lins):
                        W = Wfull(l)
                        p = sum(Gi[k] @ (W - Wi[k]) @ Si[k] * scale + (mi[k] if use_m else 0) for Gi, Si, Wi, mi in old) / len(old)
                        preds.append(p)
                if rule == "sign":
                    new = []
                    for gr, p in zip(grads, preds):
                        keep = gr * p > 0
                        if tau > 0: keep |= p.abs() < tau * p.abs().mean()
                        new.append(torch.where(keep, gr, torch.zeros_like(gr)))
                elif rule == "average":
                    tt = len(old); new = [(gr + tt * p) / (tt + 1) for gr, p in zip(grads, preds)]
                if it % 500 == 0:
                    ox = torch.cat([Xtr[:2000][:, perms[k]] for k in range(t)]); oy = Ytr[:2000].repeat(t)
                    net.zero_grad(); nn.functional.cross_entropy(net(ox), oy).backward()
                    true = torch.cat([torch.cat([l.weight.grad, l.bias.grad[:, None]], 1).reshape(-1) for l in lins])
                    pr = torch.cat([p.reshape(-1) for p in preds])
                    agree = ((true * pr) > 0).float().mul(true.abs()).sum().item() / true.abs().sum().item()
                    cos = torch.nn.functional.cosine_similarity(true, pr, 0).item()
                    diag.append((t, it, round(agree,3), round(cos,3)))
            with torch.no_grad():
                for l, gr in zip(lins, new):
                    l.weight -= lr * gr[:, :-1]; l.bias -= lr * gr[:, -1]
        R.append([acc(j) for j in range(T)])
        entry = ([Gk / n for Gk in G], [Sk / n for Sk in S], [Wfull(l).clone() for l in lins], [m.clone() for m in M])
        old.append(entry)
    Rt = torch.tensor(R)
    return Rt[-1].mean().item(), (Rt[-1, :-1] - Rt.diag()[:-1]).mean().item(), diag

if __name__ == "__main__":
    kw = dict(a.split("=") for a in sys.argv[1:])
    kw = {k: (v if k == "rule" else float(v)) for k, v in kw.items()}
    for k in ("seed", "iters", "use_m", "every"):
        if k in kw: kw[k] = int(kw[k])
    t0 = time.time(); a, b, d = run(**kw)
    print(json.dumps({"kw": kw, "acc": round(a, 4), "bwt": round(b, 4), "secs": round(time.time() - t0), "diag": d[-6:]}))
