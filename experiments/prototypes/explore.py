"""Fast plain-PyTorch exploration of old-gradient predictors + eq.5 on Permuted FMNIST."""
import os, sys, time, json, math
import torch, torchvision
from torch import nn
torch.set_num_threads(2)
ds = torchvision.datasets.FashionMNIST(os.environ.get("DATA_ROOT", "../shared/data"), train=True)
dt = torchvision.datasets.FashionMNIST(os.environ.get("DATA_ROOT", "../shared/data"), train=False)
Xtr = ds.data.float().div(255).view(-1, 784); Ytr = ds.targets
Xte = dt.data.float().div(255).view(-1, 784); Yte = dt.targets
mean, std = Xtr.mean(), Xtr.std()
Xtr = (Xtr - mean) / std; Xte = (Xte - mean) / std

def run(method, seed=0, lr=0.03, T=5, iters=2000, bs=64, **kw):
    g = torch.Generator().manual_seed(seed)
    perms = [torch.arange(784)] + [torch.randperm(784, generator=g) for _ in range(T - 1)]
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(784,256),nn.ReLU(),nn.Linear(256,256),nn.ReLU(),nn.Linear(256,256),nn.ReLU(),nn.Linear(256,10))
    params = list(net.parameters())
    def flat(ts): return torch.cat([t.reshape(-1) for t in ts])
    def setflatgrad(v):
        o = 0
        for p in params:
            n = p.numel(); p.grad.copy_(v[o:o+n].view_as(p)); o += n
    def acc(t):
        with torch.no_grad(): return (net(Xte[:, perms[t]]).argmax(1) == Yte).float().mean().item()
    def grad_on(X, Y):
        net.zero_grad(); nn.functional.cross_entropy(net(X), Y).backward(); return flat([p.grad for p in params])
    P = sum(p.numel() for p in params)
    A = torch.zeros(P); B = torch.zeros(P); nt = 0   # predictor: pred = A + B*theta (running mean)
    ewc_F = []; ewc_star = []
    mem = []  # replay memory (x, y) per old task
    R = []; diag = []
    lam = kw.get("lam", 1.0); tau = kw.get("tau", 0.0)
    for t in range(T):
        Fsum = torch.zeros(P); mema = torch.zeros(P); nF = 0
        idx_all = torch.randperm(60000, generator=g)
        for it in range(iters):
            idx = torch.randint(0, 60000, (bs,), generator=g)
            x = Xtr[idx][:, perms[t]]; y = Ytr[idx]
            grad = grad_on(x, y)
            theta = flat([p.detach() for p in params])
            Fsum += grad * grad; nF += 1
            mema.mul_(0.99).add_(grad, alpha=0.01)
            new = grad
            if t > 0:
                if method == "replay":
                    ox = torch.cat([m[0] for m in mem]); oy = torch.cat([m[1] for m in mem])
                    j = torch.randint(0, len(oy), (int(kw.get("rb", bs)),), generator=g)
                    pred = grad_on(ox[j], oy[j])
                elif method == "taylor":
                    pred = A + B * theta
                elif method == "trust":
                    pred = A + B * theta  # = B (theta - anchor) with use_m=0
                    rel = (B / B.mean().clamp_min(1e-30)).clamp_min(1e-12)
                    radius = kw["r0"] / rel.sqrt()
                    anchor = -A / B.clamp_min(1e-30)
                    inside = (theta - anchor).abs() < radius
                elif method == "ewc":
                    pen = sum(F * (theta - s) for F, s in zip(ewc_F, ewc_star))
                    new = grad + lam * pen
                    pred = None
                else:
                    pred = None
                if pred is not None:
                    if method == "trust":
                        keep = (grad * pred > 0) | inside
                    elif tau > 0:
                        # magnitude-aware: veto only where the prediction is confident
                        thr = tau * pred.abs().mean()
                        keep = (grad * pred > 0) | (pred.abs() < thr)
                    else:
                        keep = grad * pred > 0
                    new = torch.where(keep, grad, torch.zeros_like(grad))
                    if it % 500 == 0:
                        # diagnostic: agreement of pred with true old gradient (replay-free oracle)
                        ox = torch.cat([Xtr[:2000][:, perms[k]] for k in range(t)]); oy = Ytr[:2000].repeat(t)
                        true = grad_on(ox, oy)
                        sig = true.abs() > 0
                        agree = ((true * pred) > 0).float().mul(true.abs()).sum().item() / true.abs().sum().item()
                        diag.append((t, it, agree, (~keep).float().mean().item()))
            setflatgrad(new)
            with torch.no_grad():
                for p in params: p -= lr * p.grad
        R.append([acc(j) for j in range(T)])
        theta = flat([p.detach() for p in params])
        F = Fsum / nF
        m = mema if kw.get("use_m", 1.0) and method != "trust" else torch.zeros(P)
        Bi = lam * F
        Ai = m - Bi * theta
        A = (nt * A + Ai) / (nt + 1); B = (nt * B + Bi) / (nt + 1); nt += 1
        ewc_F.append(F); ewc_star.append(theta.clone())
        k = torch.randperm(60000, generator=g)[:int(kw.get("mem", 256))]
        mem.append((Xtr[k][:, perms[t]], Ytr[k]))
    Rt = torch.tensor(R)
    accv = Rt[-1].mean().item(); bwt = (Rt[-1, :-1] - Rt.diag()[:-1]).mean().item()
    return accv, bwt, Rt, diag

if __name__ == "__main__":
    method = sys.argv[1]; kw = {k: float(v) for k, v in (a.split("=") for a in sys.argv[2:])}
    seed = int(kw.pop("seed", 0)); lr = kw.pop("lr", 0.03); iters = int(kw.pop("iters", 2000))
    t0 = time.time()
    a, b, R, diag = run(method, seed=seed, lr=lr, iters=iters, **kw)
    print(json.dumps({"method": method, "kw": kw, "seed": seed, "lr": lr, "acc": round(a,4), "bwt": round(b,4), "secs": round(time.time()-t0), "diag": [tuple(round(v,3) for v in d) for d in diag][-6:]}))
