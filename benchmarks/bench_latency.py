"""Where the README's main job spends its wall time, against the same fit as a bare loop.

    python benchmarks/bench_latency.py [--repeats 2]

Side by side, each in its own process, alternating:

* **ours**: ``dhte run jobs/fe_hte_quickstart.yaml`` (200k rows simulated, 2 DDP workers
  on an embedded Ray, 12 epochs, evaluation and report), timed stage by stage from the
  log records it emits (a handler records each record's timestamp);
* **bare**: the same model (``FixedEffectsHTE``, linear nets), the same rows (the parquet
  the job simulated), the same batch size, epochs, LR, cosine schedule and optimiser, in
  one process with plain PyTorch: read, standardise, train, score. No Ray, no
  validation split, no checkpoints, no warm start, no report.

The stage table says which fixed costs the job pays at this size; the ratio ours / bare
is the price of the pipeline on a small job (goal in issue 14: ours ≤ 20 s wall).
Results: ``results/latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from common import ROOT, WORK, run_measured, save

SPEC = "jobs/fe_hte_quickstart.yaml"

# Stage boundaries: (stage name, regex on a log message that marks the stage's end).
STAGES = [
    ("python + imports", r"started an embedded Ray|\[simulate\]"),
    ("ray start", r"started an embedded Ray"),
    ("simulate", r"\[simulate\]"),
    ("prepare (profile, split)", r"\[prepare\]"),
    ("run directory", r"\[run\]"),
    ("linear start (exact pass)", r"\[fit\] \d+ workers"),
    ("worker group start + epoch 1", r"\[train\] epoch 1/\d+ done"),
    ("epochs 2..N", r"\[train\] epoch (\d+)/\1 done|stopped: "),
    ("train shutdown", r"\[fit\] fixed effects"),
    ("fixed-effect finish", r"\[evaluate\]"),
    ("evaluate + report + Ray shutdown", r"^END$"),
]

OURS = """
import json, logging, sys, time
t0 = time.time()
records = []
class Timeline(logging.Handler):
    def emit(self, record):
        records.append((record.created, record.getMessage()))
from distributed_hte import cli
logging.getLogger().addHandler(Timeline())
logging.getLogger().setLevel(logging.INFO)
rc = cli.main(["run", *sys.argv[1:]])
records.append((time.time(), "END"))
print(json.dumps({"rc": rc, "t0": t0, "records": records}))
"""

BARE = """
import glob, json, math, sys, time
t0 = time.perf_counter()
import numpy as np, pyarrow.parquet as pq, torch
from distributed_hte.models.config import MLPConfig
from distributed_hte.models.fe_hte import FixedEffectsHTE
torch.set_num_threads(1)
torch.manual_seed(0)
spec = json.loads(sys.argv[2])
d = spec["data"]
table = pq.read_table(sorted(glob.glob(sys.argv[1] + "/*.parquet")))
cols = {c: table.column(c).to_numpy() for c in table.column_names}
xb = np.stack([cols[c] for c in d["beta_features"]], 1).astype(np.float32)
xg = np.stack([cols[c] for c in d["g_features"]], 1).astype(np.float32)
ids = np.stack([np.unique(cols[c], return_inverse=True)[1] for c in d["fixed_effects"]], 1)
sizes = [int(ids[:, f].max()) + 1 for f in range(ids.shape[1])]
t = torch.from_numpy(cols[d["treatment"]].astype(np.float32))
y = torch.from_numpy(cols[d["outcome"]].astype(np.float32))
xb_t, xg_t, ids_t = torch.from_numpy(xb), torch.from_numpy(xg), torch.from_numpy(ids)
lin = MLPConfig(hidden=())
model = FixedEffectsHTE(xb.shape[1], xg.shape[1], sizes, lin, lin,
    beta_mean=xb.mean(0).tolist(), beta_scale=xb.std(0).tolist(),
    g_mean=xg.mean(0).tolist(), g_scale=xg.std(0).tolist())
fe = [p for n, p in model.named_parameters() if n.startswith("fixed_effects.")]
rest = [p for n, p in model.named_parameters() if not n.startswith("fixed_effects.")]
tr = spec["train"]
opt = torch.optim.Adam([{"params": rest, "lr": tr["lr"]}, {"params": fe, "lr": 10 * tr["lr"]}])
base = [g["lr"] for g in opt.param_groups]
n, bs, epochs = len(y), tr["batch_size"], tr["epochs"]
steps, step = epochs * math.ceil(n / bs), 0
t1 = time.perf_counter()
for epoch in range(epochs):
    perm = torch.randperm(n)
    total = 0.0
    for i in range(0, n, bs):
        idx = perm[i : i + bs]
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        out = model(xb_t[idx], xg_t[idx], t[idx], ids_t[idx])
        loss = torch.mean((out["y_hat"] - y[idx]) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        total += float(loss.detach()) * len(idx)
t2 = time.perf_counter()
with torch.no_grad():
    mse = float(torch.mean((model(xb_t, xg_t, t, ids_t)["y_hat"] - y) ** 2))
print(json.dumps({"load_s": t1 - t0, "train_s": t2 - t1, "score_s": time.perf_counter() - t2,
                  "final_train_loss": total / n, "mse": mse}))
"""


def stage_times(t0: float, records: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds per stage, from the first record matching each stage's end marker."""
    import re

    out, previous = {}, t0
    for name, pattern in STAGES:
        hits = [t for t, msg in records if t >= previous and re.search(pattern, msg)]
        if not hits:
            continue
        out[name] = round(hits[0] - previous, 2)
        previous = hits[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import yaml

    spec = yaml.safe_load((ROOT / SPEC).read_text())
    result = {"command": "python benchmarks/bench_latency.py " + " ".join(sys.argv[1:]), "runs": []}
    for r in range(args.repeats):
        out = WORK / "latency" / f"r{r}"
        before = os.getloadavg()[0]
        ours = run_measured(
            [sys.executable, "-c", OURS, SPEC, f"outputs.dir={out}"], WORK / f"latency_ours_{r}.log"
        )
        timeline = json.loads(ours["last_line"])
        if timeline["rc"] != 0:
            raise SystemExit(f"dhte run failed, see {WORK / f'latency_ours_{r}.log'}")
        data = next((out / "data").glob("fe_hte_quickstart-*")) / "data"
        bare = run_measured(
            [sys.executable, "-c", BARE, str(data), json.dumps(spec)],
            WORK / f"latency_bare_{r}.log",
        )
        bare_fit = json.loads(bare["last_line"])
        run = {
            "ours_wall_s": round(ours["seconds"], 2),
            "ours_peak_pss_gb": round(ours["peak_pss_gb"], 2),
            "stages_s": stage_times(timeline["t0"], timeline["records"]),
            "bare_wall_s": round(bare["seconds"], 2),
            "bare_peak_pss_gb": round(bare["peak_pss_gb"], 2),
            "bare": bare_fit,
            "ratio_wall_ours_over_bare": round(ours["seconds"] / bare["seconds"], 2),
            "load_avg_1m": [before, os.getloadavg()[0]],
        }
        result["runs"].append(run)
        print(json.dumps(run, indent=1), flush=True)
        save("latency", result)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
