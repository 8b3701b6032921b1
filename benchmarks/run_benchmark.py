"""ANHIR landmark benchmark: the bundle (affine only, and full) against elastix, same machine, same pairs, one run.

From the repository root::

    python benchmarks/run_benchmark.py --pairs_csv ../shared/data/anhir-samples/pairs.csv --working_size 1024 \\
        --repeats 3 --output_dir benchmarks/results

Runs, one after the other, each as its own subprocess (so that its peak resident memory is its own):

1. ``bundle-affine``: ``python -m monai.bundle run inference ... --iterations 0 --refine False`` (from ``bundle/``).
   With no inner iterations the nonrigid engine returns the affine initial field unchanged (checked: its rTRE equals
   the affine stage's to 1e-9), so this is the affine-only variant of the pipeline, timed end to end.
2. ``bundle-networks``: ``--refine False``: affine + the learned networks, without the mutual-information refinement.
3. ``bundle-refined-affine``: ``--iterations 0``: affine + the refinement, the networks skipped.
4. ``bundle``: the shipped defaults (affine + networks + refinement).
5. ``elastix``: ``python benchmarks/elastix_registration.py`` (rotation search, affine, B-spline; see that file),
   on the same working grid, with all cores.

(``--repeats N``: N times over, the tools taking turns; each repeat's time ratios are reported), then scores each
results table of the first repeat with ``python -m monai.bundle run evaluate`` (ANHIR protocol: rTRE = landmark error /
target diagonal), and writes ``<output_dir>/anhir-benchmark.json`` and the markdown fragment
``anhir-benchmark.md``. Tool outputs go to ``<output_dir>/runs/anhir/`` (not committed).

Times: *seconds per pair* is the mean of the results table's ``Execution time [minutes]`` (per pair, image loading
and output writing included; process start-up, imports and model loading excluded, elastix's one-off component
loading likewise excluded by a warm-up); *registration seconds* sums the per-pair ``registration.json`` stages
without the outputs (the bundle writes a warped full-resolution slide, a NIfTI field and six PNG panels per pair;
the elastix script writes only landmarks and parameter files). *Wall* is the whole command, start-up included.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from pathlib import Path

from common import BENCHMARKS, BUNDLE, REPO, RESULTS, available_cores, command_line, machine_info, markdown_table
from common import require_elastix, run_measured, write_outputs

# tool -> (final stage label in run evaluate, what it is)
TOOLS = {
    "bundle-affine": ("affine-only", "bundle, affine stage only (`--iterations 0 --refine False`)"),
    "bundle-networks": ("networks", "bundle, affine + learned networks, no refinement (`--refine False`)"),
    "bundle-refined-affine": ("refined-affine", "bundle, affine + MI refinement, networks skipped (`--iterations 0`)"),
    "bundle": ("refinement", "bundle, shipped defaults: affine + learned networks + MI refinement"),
    "elastix": ("elastix", "elastix (itk-elastix): rotation search + affine + B-spline, Mattes MI, same working grid"),
}


def run_tool(tool: str, pairs_csv: Path, run_dir: Path, log: Path, args: argparse.Namespace) -> dict:
    """Run ``tool`` on a cover table into ``run_dir``, measured (:func:`common.run_measured`): the bundle with
    ``args.bundle_threads`` threads where given, elastix with ``args.threads``; the record says which."""
    command, cwd = tool_command(tool, pairs_csv, run_dir, args.working_size, args.threads)
    env = None
    if tool.startswith("bundle") and args.bundle_threads:
        threads = str(args.bundle_threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    run = run_measured(command, cwd, log, env=env)
    run["threads"] = args.threads if tool == "elastix" else (args.bundle_threads or "torch default")
    return run


def tool_command(tool: str, pairs_csv: Path, output_dir: Path, working_size: int, threads: int) -> tuple[list, Path]:
    if tool.startswith("bundle"):
        command = [
            sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.yaml",
            "--pairs_csv", str(pairs_csv), "--output_dir", str(output_dir), "--working_size", str(working_size),
            "--skip_done", "False",  # a run must register, not reuse an earlier run's pairs from the same inputs
        ]
        if tool in ("bundle-affine", "bundle-refined-affine"):
            command += ["--iterations", "0"]
        if tool in ("bundle-affine", "bundle-networks"):
            command += ["--refine", "False"]
        return command, BUNDLE
    command = [
        sys.executable, str(BENCHMARKS / "elastix_registration.py"), "--pairs_csv", str(pairs_csv),
        "--output_dir", str(output_dir), "--working_size", str(working_size), "--threads", str(threads),
    ]
    return command, REPO


def evaluate_command(pairs_csv: Path, results_csv: Path, output_dir: Path, final_stage: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "evaluate", "--config_file", "configs/evaluate.yaml",
        "--pairs_csv", str(pairs_csv), "--results_csv", str(results_csv), "--output_dir", str(output_dir),
        "--final_stage", final_stage,
    ]


def read_results(results_csv: Path) -> list[dict[str, str]]:
    if not results_csv.is_file():
        return []
    with results_csv.open(newline="") as handle:
        return list(csv.DictReader(handle))


def timing_summary(rows: list[dict[str, str]], run_dir: Path) -> dict:
    """Per-pair seconds from the results table and the per-pair registration.json stage timings."""
    minutes = []
    for row in rows:
        try:
            minutes.append(float(row.get("Execution time [minutes]") or "nan"))
        except ValueError:
            pass
    seconds = [60 * m for m in minutes if math.isfinite(m)]
    stage_totals: dict[str, list[float]] = {}
    registration_only = []
    for record_path in sorted(run_dir.glob("*/registration.json")):
        timings = json.loads(record_path.read_text()).get("timings_seconds", {})
        for stage, value in timings.items():
            stage_totals.setdefault(stage, []).append(value)
        registration_only.append(sum(v for k, v in timings.items() if k != "outputs"))
    return {
        "seconds_per_pair_mean": statistics.fmean(seconds) if seconds else None,
        "seconds_per_pair_median": statistics.median(seconds) if seconds else None,
        "seconds_per_pair": seconds,
        "registration_seconds_per_pair_mean": statistics.fmean(registration_only) if registration_only else None,
        "stage_seconds_mean": {stage: statistics.fmean(values) for stage, values in stage_totals.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs_csv", type=Path, default=REPO.parent / "shared/data/anhir-samples/pairs.csv")
    parser.add_argument("--working_size", type=int, default=1024)
    parser.add_argument("--output_dir", type=Path, default=RESULTS)
    parser.add_argument("--tools", nargs="+", choices=list(TOOLS), default=list(TOOLS))
    parser.add_argument("--threads", type=int, default=available_cores(), help="elastix threads (default: all)")
    parser.add_argument(
        "--bundle_threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS / MKL_NUM_THREADS for the bundle's processes (default: unset, i.e. torch uses all "
        "cores). On a machine shared with other work, torch with every core is very slow (docs/design.md, "
        "'Measurements behind the code'); 1 gives usable development numbers there.",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every tool this many times, the tools taking turns, and report each repeat's time ratios: on a "
        "shared machine a slow minute can fall on one tool's run. Landmarks are scored on the first repeat.",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    require_elastix(parser, args.tools)
    pairs_csv, output_dir = args.pairs_csv.resolve(), args.output_dir.resolve()
    runs = output_dir / "runs" / "anhir"
    machine = machine_info()

    tools = {}
    for repeat in range(1, args.repeats + 1):
        # the first repeat's outputs are the ones scored; later repeats only add timings
        repeat_dir = runs if repeat == 1 else runs / f"repeat-{repeat}"
        for tool in args.tools:
            run_dir = repeat_dir / tool
            run = run_tool(tool, pairs_csv, run_dir, repeat_dir / f"{tool}.log", args)
            print(f"{tool} (repeat {repeat}): exit {run['returncode']}, {run['wall_seconds']:.1f} s, "
                  f"peak RSS {run['peak_rss_mb']:.0f} MB")
            timing = timing_summary(read_results(run_dir / "registration-results.csv"), run_dir)
            tools.setdefault(tool, {"run": run, "run_dir": str(run_dir), "repeats": []})["repeats"].append(
                {"run": run, "timing": timing}
            )

    for tool, record in tools.items():
        run_dir = Path(record["run_dir"])
        final_stage = TOOLS[tool][0]
        results_csv = run_dir / "registration-results.csv"
        rows = read_results(results_csv)
        record["failures"] = {
            row.get("Target image", "?") + " <- " + row.get("Source image", "?"): row.get("Status", "")
            for row in rows
            if row.get("Status") != "OK"
        }
        record["timing"] = record["repeats"][0]["timing"]
        if not rows:
            record["metrics"] = None
            continue
        evaluation_dir = runs / f"{tool}-evaluation"
        evaluation = run_measured(
            evaluate_command(pairs_csv, results_csv, evaluation_dir, final_stage), BUNDLE, runs / f"{tool}-evaluate.log"
        )
        record["evaluation"] = evaluation
        metrics_path = evaluation_dir / "metrics.json"
        record["metrics"] = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
        pairs_path = evaluation_dir / "evaluation-pairs.csv"
        record["per_pair"] = read_results(pairs_path)

    summary = summarise(tools)
    record = {
        "benchmark": "anhir",
        "command": command_line(),
        "pairs_csv": str(args.pairs_csv),
        "working_size": args.working_size,
        "machine": machine,
        "load_average_at_end": list(os.getloadavg()),
        "tools": tools,
        "summary": summary,
    }
    write_outputs(output_dir, "anhir-benchmark", record, render_markdown(record))
    return 0 if all(t["run"]["returncode"] == 0 for t in tools.values()) else 1


def summarise(tools: dict) -> dict:
    """One row per tool (and elastix's affine stage), plus elastix's time over each bundle variant's."""
    rows = {}
    for tool, record in tools.items():
        metrics = record.get("metrics") or {}
        overall = metrics.get("overall", {})
        final = overall.get(TOOLS[tool][0], {})
        rows[tool] = {
            "description": TOOLS[tool][1],
            "pairs": final.get("pairs"),
            # pairs counted as not registered by the evaluation (failed, or missing from the table); the results
            # table's failed Status alone where there is no evaluation
            "failures": len(metrics["not_registered"]) if metrics else len(record["failures"]),
            "median_median_rtre": final.get("median_median_rtre"),
            "mean_median_rtre": final.get("mean_median_rtre"),
            "mean_max_rtre": final.get("mean_max_rtre"),
            "mean_robustness": final.get("mean_robustness"),
            "seconds_per_pair": record["timing"]["seconds_per_pair_mean"],
            "seconds_per_pair_median": record["timing"]["seconds_per_pair_median"],
            "registration_seconds_per_pair": record["timing"]["registration_seconds_per_pair_mean"],
            "wall_seconds": record["run"]["wall_seconds"],
            "peak_rss_mb": record["run"]["peak_rss_mb"],
        }
        if tool == "elastix" and "affine" in overall:
            stages = record["timing"]["stage_seconds_mean"]
            affine = overall["affine"]
            rows["elastix-affine"] = {
                "description": "elastix, its affine stage (rotation search + affine), from the same run",
                "pairs": affine.get("pairs"),
                "failures": rows[tool]["failures"],
                "median_median_rtre": affine.get("median_median_rtre"),
                "mean_median_rtre": affine.get("mean_median_rtre"),
                "mean_max_rtre": affine.get("mean_max_rtre"),
                "mean_robustness": affine.get("mean_robustness"),
                "seconds_per_pair": None,
                "seconds_per_pair_median": None,
                "registration_seconds_per_pair": sum(
                    stages.get(stage, 0.0) for stage in ("loading", "preprocessing", "rotation_search", "affine")
                ) or None,
                "wall_seconds": None,
                "peak_rss_mb": None,
            }
    ratios, repeat_ratios = {}, {}
    elastix = rows.get("elastix", {})
    for ours in ("bundle", "bundle-refined-affine", "bundle-networks", "bundle-affine"):
        mine = rows.get(ours, {})
        for key in ("seconds_per_pair", "registration_seconds_per_pair"):
            if elastix.get(key) and mine.get(key):
                ratios[f"elastix_over_{ours}_{key}"] = elastix[key] / mine[key]
            if "elastix" in tools and ours in tools:
                # the repeats' own ratios: each repeat's elastix run against the same repeat's bundle run
                pairs = zip(tools["elastix"]["repeats"], tools[ours]["repeats"])
                values = [e["timing"][f"{key}_mean"] / b["timing"][f"{key}_mean"] for e, b in pairs
                          if e["timing"][f"{key}_mean"] and b["timing"][f"{key}_mean"]]
                if values:
                    repeat_ratios[f"elastix_over_{ours}_{key}"] = values
    return {"rows": rows, "time_ratios": ratios, "time_ratios_per_repeat": repeat_ratios}


def render_markdown(record: dict) -> str:
    summary, machine = record["summary"], record["machine"]
    header = [
        "tool", "pairs", "failures", "median rTRE", "mean rTRE", "mean max rTRE", "robustness", "s / pair",
        "registration s / pair", "wall s (command)", "peak RSS MB",
    ]
    rows = [
        [
            f"`{tool}`", row["pairs"], row["failures"], row["median_median_rtre"], row["mean_median_rtre"],
            row["mean_max_rtre"], row["mean_robustness"], row["seconds_per_pair"], row["registration_seconds_per_pair"],
            row["wall_seconds"], row["peak_rss_mb"],
        ]
        for tool, row in summary["rows"].items()
    ]
    threads = {tool: t["run"].get("threads") for tool, t in record["tools"].items()}
    lines = [
        "## ANHIR landmarks: bundle vs elastix",
        "",
        f"`{record['command']}`: working size {record['working_size']} px, cover table `{record['pairs_csv']}`, "
        f"{machine['cpu']} ({machine['cores']} cores, {machine['ram_gb']} GB RAM), threads {threads}, load average "
        f"{_load(machine.get('load_average_at_start'))} at the start and {_load(record.get('load_average_at_end'))} "
        "at the end.",
        "",
        markdown_table(header, rows),
        "",
        *[f"- `{tool}`: {row['description']}" for tool, row in summary["rows"].items()],
        "",
        "rTRE = landmark error / target image diagonal; median / mean are over pairs of the per-pair median rTRE; "
        "robustness = share of landmarks closer than before registration; failures = pairs counted as not "
        "registered. *s / pair*: mean of the results table's `Execution time` (loading and outputs included, "
        "process start-up excluded); *registration s / pair*: the same without writing outputs; *wall*: the whole "
        "command, start-up included; *peak RSS*: the command's process (the elastix process holds about 1 GB of "
        "ITK Python modules before any image).",
        "",
    ]
    ratios = summary["time_ratios"]
    if ratios:
        lines.append(
            "Time ratio elastix / bundle: "
            + ", ".join(f"{key.replace('elastix_over_', '').replace('_', ' ')} = {value:.1f}x" for key, value in ratios.items())
            + "."
        )
        lines.append("")
    repeats = summary.get("time_ratios_per_repeat", {})
    if any(len(values) > 1 for values in repeats.values()):
        lines.append(
            "Each repeat's ratio (the tools took turns; the table above is the first repeat): "
            + "; ".join(
                f"{key.replace('elastix_over_', '').replace('_', ' ')} = "
                + " / ".join(f"{value:.1f}x" for value in values)
                + f" (median {statistics.median(values):.1f}x)"
                for key, values in repeats.items()
            )
            + "."
        )
        lines.append("")
    per_pair = per_pair_table(record["tools"])
    if per_pair:
        lines += ["Median rTRE per pair:", "", per_pair, ""]
    return "\n".join(lines)


def _load(values) -> str:
    return "-" if not values else " / ".join(f"{value:.2f}" for value in values)


def per_pair_table(tools: dict) -> str:
    """Median rTRE of each pair: initial, then each tool's final stage (and elastix's affine stage)."""
    columns, names, initial = {}, [], {}
    for tool, record in tools.items():
        final = TOOLS[tool][0]
        for row in record.get("per_pair") or []:
            name = row["Pair"]
            if name not in names:
                names.append(name)
            initial.setdefault(name, row.get("rTRE median (initial)"))
            columns.setdefault(tool, {})[name] = row.get(f"rTRE median ({final})")
            if tool == "elastix" and row.get("rTRE median (affine)"):
                columns.setdefault("elastix-affine", {})[name] = row.get("rTRE median (affine)")
    if not names:
        return ""

    def number(value):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None

    header = ["pair", "initial", *columns]
    rows = [[name, number(initial.get(name)), *(number(columns[c].get(name)) for c in columns)] for name in names]
    return markdown_table(header, rows)


if __name__ == "__main__":
    sys.exit(main())
