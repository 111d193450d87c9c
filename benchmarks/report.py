"""Turn a run of this suite into a compact CSV, markdown tables, a PNG plot and docs/performance.md.

    python benchmarks/report.py RESULTS [--command CMD] [--no-plot] [--doc docs/performance.md]

RESULTS is either the pytest-benchmark JSON of a run (`<machine>.json`, not kept in git) or the
CSV this script wrote from one (`<machine>.csv`, kept in git). From a JSON it writes
`<machine>.csv`; from either it writes `<machine>.md` (every case) and `<machine>.png` next to
it. With --doc, that file is regenerated from every `*.csv` in the same folder (CPU machines
first). --command records the command that produced the run when the JSON does not (runs made
before the suite recorded its own command line).

The CSV has one row per case: suite, name, shape, dtype, B, z, pass, provider, median_s, iqr_s,
rounds, x_floor, x_eager (then, for end-to-end rows, the model's pipeline, backend and GFLOPs),
after `# key: value` lines giving the machine, the date, the commit and the command.
Every ratio is of two medians measured in the same process (same run, same machine).
"""
import argparse
import csv
import glob
import io
import json
import os
import re
import sys
from collections import defaultdict

EAGER, COMPILE, USER_COMPILE, FLOOR, TORCH = "eager", "compile", "user-compile", "floor", "torch"
NON_BACKENDS = (EAGER, COMPILE, USER_COMPILE, FLOOR)
HEADLINE = "vit-b16-224"
KERNEL_SUITES = ("prune", "zsweep", "rows")
COLUMNS = ["suite", "name", "shape", "dtype", "B", "z", "pass", "provider", "median_s", "iqr_s",
           "rounds", "x_floor", "x_eager", "device", "proposal", "pipeline", "backend",
           "gflops_per_image", "proposal_gflops_per_image"]
FLOATS = ("z", "median_s", "iqr_s", "x_floor", "x_eager", "gflops_per_image",
          "proposal_gflops_per_image")
INTS = ("B", "rounds")
META = ("machine", "device", "date", "commit", "command", "timing")


# ------------------------------------------------------------------------------------ loading

def median_s(bench):
    """CUDA-event median when the run recorded one (GPU), else pytest-benchmark's median."""
    return bench["extra_info"].get("event_median_s") or bench["stats"]["median"]


def machine_line(data):
    m = data["machine_info"].get("papr_kernels", {})
    mi = data["machine_info"]
    desc = f"{m.get('slug', '?')}: {m.get('cpu', mi.get('cpu', {}).get('brand_raw', '?'))}, " \
           f"{m.get('cores', '?')} cores, {m.get('torch_threads', '?')} torch threads"
    if m.get("gpu"):
        desc += f", GPU {m['gpu']}"
    desc += f"; torch {m.get('torch', '?')}, papr_kernels {m.get('papr_kernels', '?')}, " \
            f"backends: {', '.join(m.get('backends', [])) or 'none'}"
    if m.get("quick"):
        desc += " (QUICK MODE: few rounds, not a measurement)"
    return desc


def combine_json(paths, out):
    """Several pytest-benchmark JSONs of one machine (e.g. the e2e runs of tools/gpu_check.sh)
    as one at `out`: every benchmark, the first run's machine and commit, each run's command.
    A file that is not a complete JSON (a run killed while writing it) is named on stderr and
    left out: the other runs are still reported."""
    runs = []
    for path in paths:
        try:
            with open(path) as fh:
                runs.append(json.load(fh))
        except ValueError as exc:
            print(f"report.py: {path} left out, not a complete JSON ({exc})", file=sys.stderr)
    if not runs:
        raise SystemExit(f"report.py: no readable JSON among {', '.join(paths)}")
    data = dict(runs[0], benchmarks=[b for run in runs for b in run["benchmarks"]])
    commands = [run["machine_info"].get("papr_kernels", {}).get("command") for run in runs]
    if any(commands):
        data["machine_info"] = dict(data["machine_info"])
        data["machine_info"]["papr_kernels"] = dict(
            data["machine_info"].get("papr_kernels", {}),
            command="; ".join(c or "?" for c in commands))
    with open(out, "w") as fh:
        json.dump(data, fh)
    return out


def from_json(path, command=None):
    """(meta, rows) of a pytest-benchmark JSON, rows in the CSV's columns."""
    with open(path) as fh:
        data = json.load(fh)
    info = data["machine_info"].get("papr_kernels", {})
    meta = {
        "machine": machine_line(data),
        "device": info.get("device", "cpu"),
        "date": data.get("datetime", "")[:19].replace("T", " ") + " UTC",
        "commit": data.get("commit_info", {}).get("id", "?")[:10],
        "command": command or info.get("command") or "?",
        "timing": "median_s: CUDA-event median" if info.get("device") == "cuda" else
                  "median_s: wall-clock median",
    }
    meta["timing"] += ", iqr_s: wall-clock interquartile range (pytest-benchmark)"
    rows = []
    for bench in data["benchmarks"]:
        e = bench["extra_info"]
        suite = e.get("suite", "?")
        row = dict(suite=suite, name=bench["name"], dtype=e.get("dtype", "fp32"), B=e["batch"],
                   z=e["z"], provider=e["provider"], median_s=median_s(bench),
                   iqr_s=bench["stats"]["iqr"], rounds=bench["stats"]["rounds"],
                   device=e.get("device", meta["device"]))
        if suite == "e2e":
            row.update(shape=e["model"], proposal=e.get("proposal"), pipeline=e.get("pipeline"),
                       backend=e.get("backend"), gflops_per_image=e.get("gflops_per_image"),
                       proposal_gflops_per_image=e.get("proposal_gflops_per_image"),
                       **{"pass": "fwd"})
        else:
            row.update(shape=e["shape"], **{"pass": e["mode"]})
        rows.append(row)
    add_ratios(rows)
    return meta, rows


def add_ratios(rows):
    """x_floor (time / floor's time) and x_eager (baseline's time / time) of the kernel cases;
    the baseline is the eager reference, or the `torch` backend where a suite has no eager."""
    groups = defaultdict(dict)
    for r in rows:
        if r["suite"] in KERNEL_SUITES:
            groups[case_key(r)][r["provider"]] = r["median_s"]
    for r in rows:
        r.setdefault("x_floor", None)
        r.setdefault("x_eager", None)
        if r["suite"] not in KERNEL_SUITES:
            continue
        g, p, t = groups[case_key(r)], r["provider"], r["median_s"]
        base = baseline(g)
        if p != FLOOR and g.get(FLOOR):
            r["x_floor"] = t / g[FLOOR]
        if p not in (base, FLOOR) and base:
            r["x_eager"] = g[base] / t


def baseline(g):
    return EAGER if EAGER in g else (TORCH if TORCH in g else None)


def case_key(r):
    return (r["suite"], r["shape"], r["dtype"], r["B"], r["z"], r["pass"])


def write_csv(path, meta, rows):
    with open(path, "w", newline="") as fh:
        for k in META:
            fh.write(f"# {k}: {meta.get(k, '?')}\n")
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            out = {}
            for c in COLUMNS:
                v = r.get(c)
                if v is None:
                    out[c] = ""
                elif c in ("median_s", "iqr_s"):
                    out[c] = f"{v:.9g}"
                elif c in ("x_floor", "x_eager"):
                    out[c] = f"{v:.6g}"
                elif c in ("gflops_per_image", "proposal_gflops_per_image"):
                    out[c] = f"{v:.4f}"
                elif c == "z":
                    out[c] = f"{v:g}"
                else:
                    out[c] = v
            w.writerow(out)


def from_csv(path):
    meta, body = {}, []
    with open(path) as fh:
        for line in fh:
            if line.startswith("# ") and ":" in line and not body:
                k, v = line[2:].split(":", 1)
                meta[k.strip()] = v.strip()
            else:
                body.append(line)
    rows = []
    for r in csv.DictReader(io.StringIO("".join(body))):
        row = {}
        for k, v in r.items():
            if v == "":
                row[k] = None
            elif k in FLOATS:
                row[k] = float(v)
            elif k in INTS:
                row[k] = int(v)
            else:
                row[k] = v
        rows.append(row)
    return meta, rows


def load(path, command=None):
    if path.endswith(".json"):
        return from_json(path, command)
    meta, rows = from_csv(path)
    if command:
        meta["command"] = command
    return meta, rows


# ------------------------------------------------------------------------------------- tables

def fmt_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}x"


def kernel_groups(rows, suites=("prune", "zsweep")):
    """{(suite, shape, dtype, B, z, pass): {provider: row}}"""
    groups = defaultdict(dict)
    for r in rows:
        if r["suite"] in suites:
            groups[case_key(r)][r["provider"]] = r
    return groups


def provider_order(providers):
    backends = sorted(p for p in providers if p not in NON_BACKENDS)
    return [p for p in (EAGER, COMPILE, USER_COMPILE) if p in providers] + backends + \
        ([FLOOR] if FLOOR in providers else [])


def kernel_table(groups, keys, providers):
    """One row per case: each provider's median, x floor and speed-up over the baseline."""
    head = ["shape", "dtype", "B", "z", "pass"] + list(providers)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        _, shape, dtype, batch, z, mode = key
        g = groups[key]
        base = baseline(g)
        cells = [shape, dtype, str(batch), f"{z:g}", mode]
        for p in providers:
            r = g.get(p)
            if r is None:
                cells.append("-")
                continue
            parts = [fmt_time(r["median_s"])]
            if r.get("x_floor") is not None:
                parts.append(f"{r['x_floor']:.1f}x floor")
            if r.get("x_eager") is not None:
                parts.append(f"{r['x_eager']:.2f}x {base}")
            cells.append("<br>".join(parts))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def medians(g):
    return {p: r["median_s"] for p, r in g.items()}


def best_backend(g):
    cands = {p: t for p, t in medians(g).items() if p not in NON_BACKENDS and p != TORCH}
    if not cands:
        return None, None
    p = min(cands, key=cands.get)
    return p, cands[p]


def targets(groups, rows):
    """[(target, measured, met)] for the issue's targets (ViT-B/16-224, fp32, z = 0.5)."""
    out = []
    head = {k: g for k, g in groups.items()
            if k[0] == "prune" and k[1] == HEADLINE and k[2] == "fp32" and k[4] == 0.5}
    batches = sorted({k[3] for k in head})
    if not batches:
        return out
    bmin, bmax = batches[0], batches[-1]

    def g(batch, mode):
        return medians(head.get(("prune", HEADLINE, "fp32", batch, 0.5, mode), {}))

    def fused_missing(target):
        out.append((target, "no fused backend measured here", None))

    for batch, want in ((bmin, 10.0), (bmax, 4.0)):
        t = f"forward >= {want:g}x eager reference at B={batch}"
        p, tb = best_backend(head.get(("prune", HEADLINE, "fp32", batch, 0.5, "fwd"), {}))
        if p is None or EAGER not in g(batch, "fwd"):
            fused_missing(t)
        else:
            r = g(batch, "fwd")[EAGER] / tb
            out.append((t, f"{p}: {r:.2f}x", r >= want))

    def at_every_batch(target, mode, base, want):
        ratios = []
        for batch in batches:
            p, tb = best_backend(head.get(("prune", HEADLINE, "fp32", batch, 0.5, mode), {}))
            if p is not None and base in g(batch, mode):
                ratios.append((batch, p, g(batch, mode)[base] / tb))
        if not ratios:
            out.append((target, f"no `{base}` provider in this run", None))
        else:
            out.append((target, ", ".join(f"B={b} {p}: {r:.2f}x" for b, p, r in ratios),
                        all(r >= want for _, _, r in ratios)))

    at_every_batch("forward >= 2x torch.compile(reference) at every B", "fwd", COMPILE, 2)
    at_every_batch("forward >= 1.5x torch.compile(user's plain PyTorch) at every B", "fwd",
                   USER_COMPILE, 1.5)
    t = f"forward <= 1.3x the floor at B={bmax}"
    p, tb = best_backend(head.get(("prune", HEADLINE, "fp32", bmax, 0.5, "fwd"), {}))
    if p is None or FLOOR not in g(bmax, "fwd"):
        fused_missing(t)
    else:
        r = tb / g(bmax, "fwd")[FLOOR]
        out.append((t, f"{p}: {r:.2f}x floor", r <= 1.3))
    at_every_batch("backward >= 3x the reference autograd (every B)", "bwd", EAGER, 3)
    e2e = e2e_rows(rows)
    t = "end to end images/s at z=0.5 >= 1.9x unpruned"
    vit = [r for r in e2e if r["provider"] == "papr-z0.5" and r["shape"].startswith("vit")]
    pick = [r for r in vit if r.get("device") == "cpu" and r["B"] == 8] or vit
    if pick and pick[0]["speedup"] is not None:
        r = pick[0]
        out.append((t + f" (B={r['B']})", f"{r['speedup']:.2f}x (backend {r['backend']}, "
                    f"FLOP ratio {r['flop_ratio']:.2f}x)", r["speedup"] >= 1.9))
    return out


def targets_table(tg):
    lines = ["| target | measured | met |", "|---|---|---|"]
    for t, measured, met in tg:
        lines.append(f"| {t} | {measured} | "
                     f"{'yes' if met else ('no' if met is False else 'not measured')} |")
    return "\n".join(lines)


FAMILY_ORDER = ("vit", "swin", "convnext")   # by a model name's first word; the rest after them


def family_rank(model):
    first = model.split("_")[0]
    return FAMILY_ORDER.index(first) if first in FAMILY_ORDER else len(FAMILY_ORDER)


def e2e_rows(rows):
    e2e = [dict(r) for r in rows if r["suite"] == "e2e"]
    base = {(r["shape"], r.get("device"), r["B"]): r for r in e2e if r["provider"] == "unpruned"}
    for r in e2e:
        b = base.get((r["shape"], r.get("device"), r["B"]))
        r["images_per_s"] = r["B"] / r["median_s"]
        r["speedup"] = b["median_s"] / r["median_s"] if b else None
        r["flop_ratio"] = b["gflops_per_image"] / r["gflops_per_image"] if b else None
    order = {"unpruned": 0, "papr-z0.7": 1, "papr-z0.65": 2, "papr-z0.5": 3, "papr-z0.3": 4}
    return sorted(e2e, key=lambda r: (family_rank(r["shape"]), r["shape"],
                                      r.get("device") or "", r["B"], order.get(r["provider"], 9)))


def e2e_table(e2e):
    lines = ["| model | B | config | pipeline | GFLOPs/image (proposal) | images/s | speed-up | "
             "FLOP ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in e2e:
        lines.append(f"| {r['shape']} + {r['proposal']} | {r['B']} | {r['provider']} | "
                     f"{r['pipeline']} | {r['gflops_per_image']:.2f} "
                     f"({r['proposal_gflops_per_image']:.2f}) | {r['images_per_s']:.2f} | "
                     f"{fmt_ratio(r['speedup'])} | {fmt_ratio(r['flop_ratio'])} |")
    return "\n".join(lines)


E2E_GPU = "e2e-gpu"


COMPILED_PROPOSAL = "-cp"  # provider suffix: the proposal run with Proposal(compiled=True)
UNPRUNED_AGAIN = "unpruned-again"  # the unpruned model timed again, last in its group
PROPOSAL = "proposal"              # the proposal alone, as the patched model runs it
# Other ways to run the proposal alone (benchmarks/test_e2e.py, ViT-B bf16 eager), beside it
PROPOSAL_LEVERS = ("proposal-fp32-nchw", "proposal-nchw", "proposal-160", "proposal-128",
                   "proposal-graph", "proposal-cudnn-benchmark", "proposal-conv-relu")
PAPR_OR_BOUND = re.compile(r"(?:papr|bound)-z([0-9.]+)")   # its z; not papr-z0.5-graph
# The small-batch group (benchmarks/test_e2e.py SMALL_BATCHES): ViT-B bf16 eager, and the quick
# ViT (the CPU dry run); each model also replayed from a CUDA graph captured at its batch.
SMALL_BATCH_MODELS = ("vit_base_patch16_224", "vit_tiny_patch16_224-depth2")
SMALL_BATCH_PAPR = "papr-z0.5"
GRAPHED_PROVIDERS = {"unpruned-graph": "unpruned", "papr-z0.5-graph": "papr-z0.5"}  # -> captured


def e2e_gpu_groups(rows):
    """{(model, dtype, mode, B, device): {provider: median_s}} of the e2e-gpu suite (`pass` is
    the mode: eager or compile)."""
    groups = defaultdict(dict)
    for r in rows:
        if r["suite"] == E2E_GPU:
            provider, mode = r["provider"], r["pass"]
            if provider.endswith(COMPILED_PROPOSAL):  # its own rows, beside the plain mode's
                provider, mode = provider[:-len(COMPILED_PROPOSAL)], f"{mode}, proposal compiled"
            groups[(r["shape"], r["dtype"], mode, r["B"], r.get("device"))][provider] = \
                r["median_s"]
    for (shape, dtype, mode, batch, device), g in groups.items():
        if mode.endswith(", proposal compiled"):  # the same unpruned model and bound
            plain = groups.get((shape, dtype, mode.split(",")[0], batch, device), {})
            for p, t in plain.items():
                if p == "unpruned" or p.startswith("bound-z"):
                    g.setdefault(p, t)
    return groups


def e2e_gpu_ratios(groups):
    """One dict per (model, dtype, mode, B, z): images/s and the ratios (None where missing)."""
    out = []
    for key in sorted(groups, key=lambda k: (family_rank(k[0]), k[0], k[1],
                                             k[2] != "eager", k[2], k[3])):
        g = groups[key]
        zs = sorted({m.group(1) for m in map(PAPR_OR_BOUND.fullmatch, g) if m},
                    key=float, reverse=True)
        base, prop, again = g.get("unpruned"), g.get("proposal"), g.get(UNPRUNED_AGAIN)
        for z in zs:
            papr, bound = g.get(f"papr-z{z}"), g.get(f"bound-z{z}")
            batch = key[3]
            out.append(dict(
                model=key[0], dtype=key[1], mode=key[2], B=batch, device=key[4], z=float(z),
                unpruned=batch / base if base else None, bound=batch / bound if bound else None,
                papr=batch / papr if papr else None,
                speedup=base / papr if base and papr else None,
                bound_speedup=base / bound if base and bound else None,
                papr_vs_bound=bound / papr if bound and papr else None,
                proposal_share=prop / papr if prop and papr else None,
                drift=again / base - 1 if again and base else None))
    return out


def fmt_ips(v):
    return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def fmt_drift(d):
    return "-" if d is None else f"{100 * d:+.1f}%"


def e2e_gpu_table(ratios):
    lines = ["| model | dtype | mode | B | z | unpruned img/s | bound img/s | PaPr img/s | "
             "PaPr speed-up | bound speed-up | PaPr / bound | proposal share | unpruned drift |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ratios:
        share = "-" if r["proposal_share"] is None else f"{100 * r['proposal_share']:.0f}%"
        drift = fmt_drift(r["drift"])
        pvb = "-" if r["papr_vs_bound"] is None else f"{r['papr_vs_bound']:.2f}"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['mode']} | {r['B']} | {r['z']:g} | "
                     f"{fmt_ips(r['unpruned'])} | {fmt_ips(r['bound'])} | {fmt_ips(r['papr'])} | "
                     f"{fmt_ratio(r['speedup'])} | {fmt_ratio(r['bound_speedup'])} | {pvb} | "
                     f"{share} | {drift} |")
    return "\n".join(lines)


def proposal_levers(groups):
    """One dict per proposal variant of each e2e-gpu group that timed a lever: its median and
    its time over the default `proposal`'s (None where that is missing)."""
    out = []
    for key in sorted(groups, key=lambda k: (family_rank(k[0]), k[0], k[1],
                                             k[2], k[3])):
        g = groups[key]
        if not any(p in g for p in PROPOSAL_LEVERS):
            continue
        base = g.get(PROPOSAL)
        for p in (PROPOSAL,) + PROPOSAL_LEVERS:
            if p in g:
                out.append(dict(model=key[0], dtype=key[1], mode=key[2], B=key[3], variant=p,
                                median_s=g[p], vs_proposal=g[p] / base if base else None))
    return out


def proposal_levers_table(levers):
    lines = ["| model | dtype | mode | B | proposal run as | ms / batch | time / proposal's |",
             "|---|---|---|---|---|---|---|"]
    for r in levers:
        ratio = "-" if r["vs_proposal"] is None else f"{r['vs_proposal']:.2f}"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['mode']} | {r['B']} | {r['variant']} | "
                     f"{r['median_s'] * 1e3:.2f} | {ratio} |")
    return "\n".join(lines)


def small_batches(groups):
    """{(model, dtype, device): one dict per eager batch that timed unpruned or PaPr (eager or
    graphed), batches ascending: B, the medians of unpruned and PaPr eager and replayed from a
    CUDA graph, the unpruned drift} of SMALL_BATCH_MODELS (the regular groups' batches too)."""
    out = defaultdict(list)
    keys = [k for k, g in groups.items() if k[0] in SMALL_BATCH_MODELS and k[2] == "eager"
            and any(p in g for p in ("unpruned", SMALL_BATCH_PAPR, *GRAPHED_PROVIDERS))]
    for key in sorted(keys, key=lambda k: (SMALL_BATCH_MODELS.index(k[0]), k[1], k[4] or "",
                                           k[3])):
        (model, dtype, _, batch, device), g = key, groups[key]
        graph = {captured: g.get(p) for p, captured in GRAPHED_PROVIDERS.items()}
        base, again = g.get("unpruned"), g.get(UNPRUNED_AGAIN)
        out[(model, dtype, device)].append(dict(
            B=batch, unpruned=base, papr=g.get(SMALL_BATCH_PAPR), unpruned_graph=graph["unpruned"],
            papr_graph=graph[SMALL_BATCH_PAPR], drift=again / base - 1 if again and base else None))
    return out


def crossover(rows, unpruned, papr):
    """The smallest measured batch at which PaPr (rows' `papr` median) is faster than unpruned
    (`unpruned`): "B = <b>", "none measured (B = ...)" when it is at none, "not measured" when
    no batch timed both."""
    both = [r for r in rows if r[unpruned] and r[papr]]
    if not both:
        return "not measured"
    faster = [r["B"] for r in both if r[papr] < r[unpruned]]
    if faster:
        return f"B = {min(faster)}"
    return f"none measured (B = {', '.join(str(r['B']) for r in both)})"


def small_batches_table(rows):
    def cell(batch, t):
        return "-" if t is None else f"{t * 1e3:.2f} ({fmt_ips(batch / t)})"

    def speedup(base, t):
        return fmt_ratio(base / t if base and t else None)

    lines = ["| B | unpruned eager | PaPr eager | speed-up eager | unpruned graph | PaPr graph | "
             "speed-up graph | unpruned drift |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["B"]
        lines.append(f"| {b} | {cell(b, r['unpruned'])} | {cell(b, r['papr'])} | "
                     f"{speedup(r['unpruned'], r['papr'])} | {cell(b, r['unpruned_graph'])} | "
                     f"{cell(b, r['papr_graph'])} | "
                     f"{speedup(r['unpruned_graph'], r['papr_graph'])} | "
                     f"{fmt_drift(r['drift'])} |")
    return "\n".join(lines)


def small_batches_section(key, rows):
    model, dtype, _ = key
    z = SMALL_BATCH_PAPR.split("z", 1)[1]
    return [f"**Small batches ({model} {dtype})** (suite e2e-gpu, ms per batch (images/s) of "
            f"unpruned and PaPr at z = {z}: eager, each model called as is; graph, replayed from "
            "a CUDA graph captured at that batch (one launch a call); speed-up: unpruned's time "
            "over PaPr's; unpruned drift as above):", "", small_batches_table(rows), "",
            f"Crossover, the smallest measured batch at which PaPr is faster than unpruned: "
            f"eager {crossover(rows, 'unpruned', 'papr')}, CUDA graph "
            f"{crossover(rows, 'unpruned_graph', 'papr_graph')}.", ""]


# Issue 12's targets: (model, mode, minimum PaPr speed-up at z = 0.5, B = 256, bf16, CUDA).
E2E_GPU_TARGETS = (("vit_base_patch16_224", "eager", 1.45),
                   ("vit_base_patch16_224", "compile", 1.6),
                   ("vit_large_patch16_224", "eager", 1.75),
                   ("vit_small_patch16_224", "eager", 1.1))


# Issue 17's targets: (model, z, minimum PaPr speed-up at B = 256, bf16, CUDA), eager and
# "the same or better under torch.compile".
E2E_GPU_HIERARCHICAL_TARGETS = (("swin_tiny_patch4_window7_224", 0.65, 1.0),
                                ("convnext_tiny", 0.65, 1.0),
                                ("swin_tiny_patch4_window7_224", 0.5, 1.05),
                                ("convnext_tiny", 0.5, 1.2))


def e2e_gpu_targets(ratios):
    """[(target, measured, met)] of issues 12 (ViTs) and 17 (Swin-T, ConvNeXt-T) for the
    families this run measured in CUDA bf16; a target of a family present but a case absent
    is "not in this run"."""
    out = e2e_gpu_vit_targets(ratios)
    cuda = [r for r in ratios if r["device"] == "cuda" and r["dtype"] == "bf16"]
    if not any(r["model"] == m for r in cuda for m, _, _ in E2E_GPU_HIERARCHICAL_TARGETS):
        return out
    for mode in ("eager", "compile"):
        for model, z, want in E2E_GPU_HIERARCHICAL_TARGETS:
            t = f"{model} {mode}, B=256, z={z:g}: PaPr >= {want:g}x unpruned (issue 17)"
            r = next((r for r in cuda if (r["model"], r["mode"], r["B"], r["z"]) ==
                      (model, mode, 256, z)), None)
            if r is None or r["speedup"] is None:
                out.append((t, "not in this run", None))
            else:
                out.append((t, f"{r['speedup']:.2f}x", r["speedup"] >= want))
    return out


def e2e_gpu_vit_targets(ratios):
    """[(target, measured, met)] of issue 12 where this run measured CUDA bf16 ViT rows."""
    gpu = [r for r in ratios if r["device"] == "cuda" and r["dtype"] == "bf16"
           and r["model"].startswith("vit_")]
    if not gpu:
        return []
    out = []

    def pick(model, mode, batch=256, z=0.5):
        return next((r for r in gpu if (r["model"], r["mode"], r["B"], r["z"]) ==
                     (model, mode, batch, z)), None)

    for model, mode, want in E2E_GPU_TARGETS:
        t = f"{model} {mode}, B=256, z=0.5: PaPr >= {want:g}x unpruned"
        r = pick(model, mode)
        if r is None or r["speedup"] is None:
            out.append((t, "not in this run", None))
        else:
            out.append((t, f"{r['speedup']:.2f}x", r["speedup"] >= want))
    for model in ("vit_base_patch16_224", "vit_large_patch16_224"):
        t = f"{model} eager, B=256, z=0.5: PaPr / bound >= 0.8"
        r = pick(model, "eager")
        if r is None or r["papr_vs_bound"] is None:
            out.append((t, "not in this run", None))
        else:
            out.append((t, f"{r['papr_vs_bound']:.2f}", r["papr_vs_bound"] >= 0.8))
    slow = [r for r in gpu if r["model"] in ("vit_base_patch16_224", "vit_large_patch16_224")
            and r["B"] >= 64 and r["speedup"] is not None]
    if slow:
        worst = min(slow, key=lambda r: r["speedup"])
        out.append(("no ViT-B/L PaPr slower than unpruned at B >= 64 (every z, mode)",
                    f"slowest: {worst['model']} {worst['mode']} B={worst['B']} z={worst['z']:g}: "
                    f"{worst['speedup']:.2f}x", worst["speedup"] >= 1.0))
    return out


def plot(groups, providers, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = ("fwd", "bwd", "fwdbwd")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=False)
    for ax, mode in zip(axes, modes):
        for p in providers:
            pts = sorted((k[3], g[p]["median_s"]) for k, g in groups.items()
                         if k[0] == "prune" and k[1] == HEADLINE and k[2] == "fp32" and k[4] == 0.5
                         and k[5] == mode and p in g)
            if pts:
                ax.plot([b for b, _ in pts], [t * 1e3 for _, t in pts], marker="o", label=p,
                        linestyle="--" if p == FLOOR else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"prune {mode}: ViT-B/16-224 fp32 z=0.5")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


LEGEND = ("`x floor`: time / the floor's time (forward: a clone of the output-sized block plus "
          "one read of f; backward: a write of the whole gradient; row ops: one write "
          "of their output). `x eager` (`x torch` for the row ops): the baseline's time / this "
          "provider's time, higher is faster.")


def sections(meta, rows, name, link_prefix=""):
    """The markdown blocks of one machine: (summary, every other kernel case)."""
    groups = kernel_groups(rows)
    providers = provider_order({p for g in groups.values() for p in g})
    mode_rank = {"fwd": 0, "bwd": 1, "fwdbwd": 2}
    keys = sorted(groups, key=lambda k: (k[0], k[1] != HEADLINE, k[1], k[2], k[4], k[3],
                                         mode_rank.get(k[5], 9)))
    head_keys = [k for k in keys if k[0] == "prune" and k[1] == HEADLINE and k[2] == "fp32"]
    other_keys = [k for k in keys if k not in head_keys]
    out = [f"Machine: {meta.get('machine', '?')}. Run {meta.get('date', '?')}, commit "
           f"{meta.get('commit', '?')}, command: `{meta.get('command', '?')}`. "
           f"{meta.get('timing', '')}.", ""]
    tg = targets(groups, rows)
    if tg:
        out += ["**Targets** (ViT-B/16-224, fp32, z = 0.5; fastest fused backend, the `torch` "
                "backend not counted):", "", targets_table(tg), ""]
    if head_keys:
        out += [f"**prune, ViT-B/16-224 fp32, z = 0.5** (median):", "",
                kernel_table(groups, head_keys, providers), ""]
        png = f"{name}.png"
        out += [f"![prune latency vs batch, {name}]({link_prefix}{png})", ""]
    rgroups = kernel_groups(rows, suites=("rows",))
    if rgroups:
        rprov = provider_order({p for g in rgroups.values() for p in g})
        out += ["**Row ops of the hierarchical models** (`papr_kernels.hierarchical`, one "
                "provider per backend; `pass` is the op):", "",
                kernel_table(rgroups, sorted(rgroups), rprov), ""]
    e2e = e2e_rows(rows)
    if e2e:
        out += ["**End to end** (images/s with the proposal's cost included; GFLOPs = 2 x "
                "multiply-adds per image):", "", e2e_table(e2e), ""]
    gpu_groups = e2e_gpu_groups(rows)
    gpu = e2e_gpu_ratios(gpu_groups)
    if gpu:
        out += ["**End to end, side by side** (suite e2e-gpu: images/s with the proposal's cost "
                "included; speed-ups over unpruned; bound: the same model keeping the first k "
                "patch tokens at zero cost, ViTs only; PaPr / bound: PaPr's images/s over the "
                "bound's; proposal share: the proposal network alone over PaPr's time; "
                "unpruned drift: the unpruned model timed again after the others, over its "
                "first time, minus 1: speed-ups closer to a target than it are noise):", "",
                e2e_gpu_table(gpu), ""]
        gt = e2e_gpu_targets(gpu)
        if gt:
            out += ["**Targets of issues 12 and 17** (CUDA, bf16):", "", targets_table(gt),
                    ""]
    levers = proposal_levers(gpu_groups)
    if levers:
        out += ["**Proposal levers** (suite e2e-gpu: the proposal network alone, run each way, "
                "side by side with `proposal`, the patched model's own: fp32-nchw fp32 NCHW, "
                "the patch before issue 12; nchw the model's dtype NCHW; 160 / 128 the images "
                "resized to that size first (Proposal(image_size=S): other tokens kept); "
                "graph a CUDA graph "
                "replay; cudnn-benchmark torch.backends.cudnn.benchmark on; conv-relu each "
                "(conv, ReLU) as one torch.cudnn_convolution_relu; below 1 is faster):", "",
                proposal_levers_table(levers), ""]
    for key, small in small_batches(gpu_groups).items():
        out += small_batches_section(key, small)
    rest = kernel_table(groups, other_keys, providers) if other_keys else ""
    return "\n".join(out), rest


def build(path, make_plot=True, command=None):
    meta, rows = load(path, command)
    stem = os.path.splitext(path)[0]
    name = os.path.basename(stem)
    if path.endswith(".json"):
        write_csv(stem + ".csv", meta, rows)
    summary, rest = sections(meta, rows, name)
    md = [f"# papr_kernels benchmarks: {name}", "",
          f"<!-- generated by `python benchmarks/report.py {name}.csv` from the CSV beside it -->",
          "", LEGEND, "", summary]
    if rest:
        md += ["## All other kernel cases", "", rest, ""]
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(md))
    if make_plot:
        groups = kernel_groups(rows)
        if any(k[0] == "prune" and k[1] == HEADLINE for k in groups):
            plot(groups, provider_order({p for g in groups.values() for p in g}), stem + ".png")
    return stem


def write_doc(doc, results_dir):
    """docs/performance.md from every CSV in results_dir (CPU machines first)."""
    csvs = sorted(glob.glob(os.path.join(results_dir, "*.csv")),
                  key=lambda p: (not os.path.basename(p).startswith("cpu-"), p))
    rel = os.path.relpath(results_dir, os.path.dirname(os.path.abspath(doc)) or ".")
    text = [
        "# Performance",
        "",
        "<!-- generated by `make bench` (`python benchmarks/report.py <results> --doc "
        "docs/performance.md`) from benchmarks/results/*.csv; do not edit by hand -->",
        "",
        "`make bench` runs the benchmark suite (`benchmarks/`, pytest-benchmark), "
        "writes `benchmarks/results/<machine>.csv`, `.md` and `.png` "
        "(the raw JSON stays out of git) and regenerates this page from every CSV there. "
        "`make bench-quick` only proves the suite runs (CI). Each machine's section gives the "
        "date, commit and command of its run; every ratio is of two medians measured in that "
        "one process. The GPU runs, their context and their commands are in [gpu.md](gpu.md). "
        "CPU end to end for one model of every supported timm family "
        "(`benchmarks/families_cpu.py`): [cpu-families.md](cpu-families.md).",
        "",
        LEGEND,
        "",
    ]
    for path in csvs:
        meta, rows = from_csv(path)
        name = os.path.splitext(os.path.basename(path))[0]
        summary, rest = sections(meta, rows, name, link_prefix=f"{rel}/")
        text += [f"## {name}", "", summary]
        if rest:
            text += [f"Every other kernel case (all shapes, bf16, the z sweep): "
                     f"[{rel}/{name}.md]({rel}/{name}.md).", ""]
    with open(doc, "w") as fh:
        fh.write("\n".join(text).rstrip() + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="<machine>.json (pytest-benchmark) or "
                    "<machine>.csv; several JSONs need --combined")
    ap.add_argument("--combined", help="several JSON runs of one machine are combined into this "
                                       "JSON first, and it is reported")
    ap.add_argument("--command", help="the command that produced the run (when not recorded)")
    ap.add_argument("--doc", help="regenerate this page (docs/performance.md) from every CSV "
                                  "in the results' folder")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.combined:
        if not all(p.endswith(".json") for p in args.results):
            ap.error("--combined takes pytest-benchmark JSONs")
        results = combine_json(args.results, args.combined)
    elif len(args.results) > 1:
        ap.error("several results need --combined PATH.json")
    else:
        results = args.results[0]
    stem = build(results, make_plot=not args.no_plot, command=args.command)
    made = ([".csv"] if results.endswith(".json") else []) + [".md"] + \
        ([] if args.no_plot else [".png"])
    print(f"wrote {stem}{{{','.join(made)}}}")
    if args.doc:
        write_doc(args.doc, os.path.dirname(os.path.abspath(results)))
        print(f"regenerated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
