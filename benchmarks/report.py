"""Turn a pytest-benchmark JSON of this suite into a markdown table, a PNG plot and the README's
performance section.

    python benchmarks/report.py benchmarks/results/<machine>.json [--readme README.md] [--no-plot]

Writes <machine>.md and <machine>.png next to the JSON. With --readme, the text between
`<!-- bench:start -->` and `<!-- bench:end -->` in that file is replaced by the summary.
Every ratio is of two medians measured in the same process (same run, same machine).
"""
import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

EAGER, COMPILE, FLOOR = "eager", "compile", "floor"
NON_BACKENDS = (EAGER, COMPILE, FLOOR)
HEADLINE = "vit-b16-224"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def median_s(bench):
    """CUDA-event median when the run recorded one (GPU), else pytest-benchmark's median."""
    return bench["extra_info"].get("event_median_s") or bench["stats"]["median"]


def load(path):
    with open(path) as fh:
        data = json.load(fh)
    rows = []
    for bench in data["benchmarks"]:
        info = dict(bench["extra_info"])
        info["median_s"] = median_s(bench)
        info["rounds"] = bench["stats"]["rounds"]
        rows.append(info)
    return data, rows


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


def kernel_groups(rows):
    """{(suite, shape, dtype, batch, z, mode): {provider: median_s}}"""
    groups = defaultdict(dict)
    for r in rows:
        if r.get("suite") in ("prune", "zsweep"):
            key = (r["suite"], r["shape"], r["dtype"], r["batch"], r["z"], r["mode"])
            groups[key][r["provider"]] = r["median_s"]
    return groups


def provider_order(providers):
    backends = sorted(p for p in providers if p not in NON_BACKENDS)
    return [p for p in (EAGER, COMPILE) if p in providers] + backends + \
        ([FLOOR] if FLOOR in providers else [])


def kernel_table(groups, keys, providers):
    """One row per case: each provider's median, x floor and speed-up over eager."""
    head = ["shape", "dtype", "B", "z", "pass"] + [p for p in providers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        _, shape, dtype, batch, z, mode = key
        g = groups[key]
        cells = [shape, dtype, str(batch), f"{z:g}", mode]
        for p in providers:
            t = g.get(p)
            if t is None:
                cells.append("-")
                continue
            parts = [fmt_time(t)]
            if p != FLOOR and g.get(FLOOR):
                parts.append(f"{t / g[FLOOR]:.1f}x floor")
            if p not in (EAGER, FLOOR) and g.get(EAGER):
                parts.append(f"{g[EAGER] / t:.2f}x eager")
            cells.append("<br>".join(parts) if len(parts) > 1 else parts[0])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_backend(g, exclude_torch=True):
    cands = {p: t for p, t in g.items() if p not in NON_BACKENDS and not (exclude_torch and p == "torch")}
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
    bmin, bmax = (batches[0], batches[-1]) if batches else (None, None)

    def g(batch, mode):
        return head.get(("prune", HEADLINE, "fp32", batch, 0.5, mode), {})

    def fused_missing(target):
        out.append((target, "no fused backend available here (only the torch reference)", None))

    # forward vs eager at the smallest and largest batch
    for batch, want in ((bmin, 10.0), (bmax, 4.0)):
        t = f"forward >= {want:g}x eager reference at B={batch}"
        p, tb = best_backend(g(batch, "fwd"))
        if p is None:
            fused_missing(t)
        else:
            r = g(batch, "fwd")[EAGER] / tb
            out.append((t, f"{p}: {r:.2f}x", r >= want))
    def at_every_batch(target, mode, baseline, want):
        """The fastest fused backend against `baseline` at each batch, met when all reach `want`."""
        ratios = []
        for batch in batches:
            p, tb = best_backend(g(batch, mode))
            if p is not None and baseline in g(batch, mode):
                ratios.append((batch, p, g(batch, mode)[baseline] / tb))
        if not ratios:
            fused_missing(target)
        else:
            out.append((target, ", ".join(f"B={b} {p}: {r:.2f}x" for b, p, r in ratios),
                        all(r >= want for _, _, r in ratios)))

    at_every_batch("forward >= 2x torch.compile(reference) at every B", "fwd", COMPILE, 2)
    # floor at the largest batch
    t = f"forward <= 1.3x the floor at B={bmax}"
    p, tb = best_backend(g(bmax, "fwd"))
    if p is None:
        fused_missing(t)
    else:
        r = tb / g(bmax, "fwd")[FLOOR]
        out.append((t, f"{p}: {r:.2f}x floor", r <= 1.3))
    at_every_batch("backward >= 3x the reference autograd (every B)", "bwd", EAGER, 3)
    # end to end
    e2e = e2e_rows(rows)
    t = "end to end images/s at z=0.5 >= 1.9x unpruned"
    vit = [r for r in e2e if r["provider"] == "papr-z0.5" and r["model"].startswith("vit")]
    pick = [r for r in vit if r["device"] == "cpu" and r["batch"] == 8] or vit
    if pick:
        r = pick[0]
        out.append((t + f" (B={r['batch']})", f"{r['speedup']:.2f}x (backend {r['backend']}, "
                    f"FLOP ratio {r['flop_ratio']:.2f}x)", r["speedup"] >= 1.9))
    return out


def e2e_rows(rows):
    e2e = [dict(r) for r in rows if r.get("suite") == "e2e"]
    base = {(r["model"], r["device"], r["batch"]): r for r in e2e if r["provider"] == "unpruned"}
    for r in e2e:
        b = base.get((r["model"], r["device"], r["batch"]))
        r["images_per_s"] = r["batch"] / r["median_s"]
        r["speedup"] = b["median_s"] / r["median_s"] if b else None
        r["flop_ratio"] = b["gflops_per_image"] / r["gflops_per_image"] if b else None
    order = {"unpruned": 0, "papr-z0.7": 1, "papr-z0.65": 2, "papr-z0.5": 3, "papr-z0.3": 4}
    models = {"vit": 0, "swin": 1, "convnext": 2}
    return sorted(e2e, key=lambda r: (models.get(r["model"].split("_")[0], 9), r["model"],
                                      r["device"], r["batch"], order.get(r["provider"], 9)))


def e2e_table(e2e):
    lines = ["| model | B | config | pipeline | GFLOPs/image (proposal) | images/s | speed-up | FLOP ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in e2e:
        lines.append(f"| {r['model']} + {r['proposal']} | {r['batch']} | {r['provider']} | {r['pipeline']} | "
                     f"{r['gflops_per_image']:.2f} ({r['proposal_gflops_per_image']:.2f}) | "
                     f"{r['images_per_s']:.2f} | {fmt_ratio(r['speedup'])} | {fmt_ratio(r['flop_ratio'])} |")
    return "\n".join(lines)


def plot(groups, providers, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = ("fwd", "bwd", "fwdbwd")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=False)
    for ax, mode in zip(axes, modes):
        for p in providers:
            pts = sorted((k[3], g[p]) for k, g in groups.items()
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
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


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


def build(json_path, make_plot=True):
    data, rows = load(json_path)
    stem = os.path.splitext(json_path)[0]
    groups = kernel_groups(rows)
    providers = provider_order({p for g in groups.values() for p in g})
    mode_rank = {"fwd": 0, "bwd": 1, "fwdbwd": 2}
    keys = sorted(groups, key=lambda k: (k[0], k[1] != HEADLINE, k[1], k[2], k[4], k[3], mode_rank[k[5]]))
    head_keys = [k for k in keys if k[0] == "prune" and k[1] == HEADLINE and k[2] == "fp32"]
    other_keys = [k for k in keys if k not in head_keys]
    e2e = e2e_rows(rows)
    tg = targets(groups, rows)
    name = os.path.basename(stem)
    when = data.get("datetime", "")[:19]

    summary = [
        f"Machine: {machine_line(data)}. Run {when} UTC with `make bench` "
        f"(commit {data.get('commit_info', {}).get('id', '?')[:10]}); every ratio is of two medians measured in that one process. "
        "`x floor`: time / the floor's time (a clone of the output-sized block plus one read of f "
        "forward; a write of the whole gradient backward). `x eager`: the eager reference's time / "
        "this provider's time (higher is faster).",
        "",
        "**Targets** (ViT-B/16-224, fp32, z = 0.5; fastest fused backend, the `torch` backend not counted):",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t, measured, met in tg:
        summary.append(f"| {t} | {measured} | {'yes' if met else ('no' if met is False else 'no (nothing to measure)')} |")
    summary += ["", f"**prune, ViT-B/16-224 fp32, z = 0.5** (median; plot: `benchmarks/results/{name}.png`):",
                "", kernel_table(groups, head_keys, providers)]
    if e2e:
        summary += ["", "**End to end** (images/s with the proposal's cost included; GFLOPs = 2 x "
                    "multiply-adds per image, analytic):", "", e2e_table(e2e)]
    summary_md = "\n".join(summary)

    md = [f"# papr_kernels benchmarks: {name}", "", summary_md, "",
          "## All kernel cases", "", kernel_table(groups, other_keys, providers), ""]
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(md))
    if make_plot:
        plot(groups, providers, stem + ".png")
    return summary_md, name


def rewrite_readme(readme, summary_md, name, has_plot):
    with open(readme) as fh:
        text = fh.read()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: markers {START} / {END} not found")
    body = [START,
            f"<!-- generated by `python benchmarks/report.py benchmarks/results/{name}.json --readme README.md`;"
            " do not edit by hand -->", "", summary_md, ""]
    if has_plot:
        body += [f"![prune latency vs batch](benchmarks/results/{name}.png)", ""]
    body += [f"Every kernel case (all shapes, bf16, the z sweep): `benchmarks/results/{name}.md`.", END]
    pre, rest = text.split(START, 1)
    _, post = rest.split(END, 1)
    with open(readme, "w") as fh:
        fh.write(pre + "\n".join(body) + post)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("--readme", help="rewrite the bench section of this README")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    summary_md, name = build(args.json, make_plot=not args.no_plot)
    print(f"wrote {os.path.splitext(args.json)[0]}.md" + ("" if args.no_plot else " and .png"))
    if args.readme:
        rewrite_readme(args.readme, summary_md, name, has_plot=not args.no_plot)
        print(f"rewrote the bench section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
