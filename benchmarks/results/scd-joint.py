"""How much of B's K/V can any linear map of A's state explain? Per layer, ridge maps fitted on
the `calib` split's paired prefills (16 x 512 tokens, as `scd calibrate`), relative squared error
on the `dev` split (6 x 512 tokens) against B's own K (RoPE removed) and V, from:

  raw    A's own K or V as-is (raw reuse, re-rotation aside)
  sep    A's K -> B's K, A's V -> B's V (SCD's full-rank reuse map)
  joint  [A's K, A's V] -> B's K and B's V
  prev   joint, plus A's K and V of the previous layer
  hidden joint, plus A's attention input (the normalized hidden state W_k / W_v read)
  mlp    hidden's map plus a small MLP on the same inputs fitted to its residual (nonlinear;
         early-stopped on a tenth of the calib tokens), on the layers in MLP_LAYERS only

    [SCD_A=MODEL SCD_B=MODEL] .venv/bin/python benchmarks/results/scd-joint.py THREADS OUT.json

The pair defaults to smollm2-135m -> smollm2-135m-wiki.
"""

import json
import os
import sys

import torch

from spectrumkv.engines.hf import load
from spectrumkv.eval.ppl import corpus_chunks
from spectrumkv.scd.capture import capture, derotate, flat
from spectrumkv.scd.fit import fit_low_rank
from spectrumkv.scd.splits import split_text

PROMPT_TOKENS = 512
PROMPTS = {"calib": 16, "dev": 6}
MLP_LAYERS = (2, 8, 14, 20, 26)


def paired(a, b, split: str) -> list[dict[str, torch.Tensor]]:
    """Per layer: A's K, V, attention input and B's K, V over the split's prompts (tokens x dim)."""
    n_layers = a.fingerprint.n_layers
    text = split_text("wiki-es", split)
    per = [{k: [] for k in ("ka", "va", "xa", "kb", "vb")} for _ in range(n_layers)]
    for ids in corpus_chunks(a, text, PROMPT_TOKENS, PROMPTS[split]):
        ca = capture(a, ids, input_layers=range(n_layers))
        cb = capture(b, ids)
        # the last `rows` tokens: every layer caches them, sliding-window layers included
        rows = min(kv.keys.shape[-2] for kv in ca.pre.layers)
        for i in range(n_layers):
            per[i]["ka"].append(derotate(a, i, ca.pre.layers[i])[-rows:])
            per[i]["va"].append(flat(ca.pre.layers[i].values)[-rows:])
            per[i]["xa"].append(ca.inputs[i][-rows:])
            per[i]["kb"].append(derotate(b, i, cb.pre.layers[i])[-rows:])
            per[i]["vb"].append(flat(cb.pre.layers[i].values)[-rows:])
    return [{k: torch.cat(v).double() for k, v in layer.items()} for layer in per]


def ridge(x: torch.Tensor, y: torch.Tensor):
    """The full-rank ridge map x -> y as `scd calibrate` fits it (`fit.fit_low_rank`)."""
    w, bias = fit_low_rank(x, y).full_map()
    return lambda z: z @ w + bias


def residual_mlp(x: torch.Tensor, y: torch.Tensor, base, width: int = 256, steps: int = 1500):
    """base(z) + MLP(z), the MLP fitted to y - base(x) by Adam on 90 % of the rows, keeping the
    weights best on the other 10 %."""
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(x.shape[0], generator=g)
    cut = x.shape[0] * 9 // 10
    mx, sx = x.mean(0), x.std(0) + 1e-6
    xn, res = ((x - mx) / sx).float(), (y - base(x)).float()
    tr, va = perm[:cut], perm[cut:]
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], width), torch.nn.GELU(),
                              torch.nn.Linear(width, y.shape[1]))  # fmt: skip
    torch.nn.init.zeros_(net[2].weight)
    torch.nn.init.zeros_(net[2].bias)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    best, best_state = float("inf"), None
    for step in range(steps):
        idx = tr[torch.randint(0, cut, (512,), generator=g)]
        loss = ((net(xn[idx]) - res[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 49:
            with torch.no_grad():
                v = float(((net(xn[va]) - res[va]) ** 2).mean())
            if v < best:
                best, best_state = v, {k: t.clone() for k, t in net.state_dict().items()}
    net.load_state_dict(best_state)

    @torch.no_grad()
    def predict(z: torch.Tensor) -> torch.Tensor:
        return base(z) + net(((z - mx) / sx).float()).double()

    return predict


def rel_err(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def inputs(layers: list[dict], i: int) -> dict[str, torch.Tensor]:
    cur = layers[i]
    joint = torch.cat([cur["ka"], cur["va"]], 1)
    prev = layers[i - 1] if i else None
    return {
        "joint": joint,
        "prev": joint if prev is None else torch.cat([joint, prev["ka"], prev["va"]], 1),
        "hidden": torch.cat([joint, cur["xa"]], 1),
    }


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]))
    a = load(os.environ.get("SCD_A", "smollm2-135m"))
    b = load(os.environ.get("SCD_B", "smollm2-135m-wiki"))
    train, test = paired(a, b, "calib"), paired(a, b, "dev")
    rows = []
    for i in range(len(train)):
        xs, txs = inputs(train, i), inputs(test, i)
        row = {"layer": i}
        for kv in ("k", "v"):
            y, ty = train[i][kv + "b"], test[i][kv + "b"]
            row[f"raw_{kv}"] = rel_err(test[i][kv + "a"], ty)
            row[f"sep_{kv}"] = rel_err(ridge(train[i][kv + "a"], y)(test[i][kv + "a"]), ty)
            for name in ("joint", "prev", "hidden"):
                row[f"{name}_{kv}"] = rel_err(ridge(xs[name], y)(txs[name]), ty)
            if i in MLP_LAYERS:
                fit = residual_mlp(xs["hidden"], y, ridge(xs["hidden"], y))
                row[f"mlp_{kv}"] = rel_err(fit(txs["hidden"]), ty)
        rows.append(row)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), flush=True)  # fmt: skip
    keys = [k for k in rows[0] if k != "layer" and not k.startswith("mlp")]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    mlp_rows = [r for r in rows if r["layer"] in MLP_LAYERS]
    for kv in ("k", "v"):  # the MLP layers only, beside the linear maps on the same layers
        for name in ("sep", "hidden", "mlp"):
            vals = [r[f"{name}_{kv}"] for r in mlp_rows]
            mean[f"{name}_{kv}_mlp_layers"] = sum(vals) / len(vals)
    print("mean", json.dumps(mean))
    out = {"producer": a.name, "consumer": b.name, "corpus": "wiki-es", "prompts": PROMPTS,
           "prompt_tokens": PROMPT_TOKENS, "mean": mean, "layers": rows}  # fmt: skip
    with open(sys.argv[2], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
