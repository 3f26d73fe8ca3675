"""`python -m clipadapt.report <sweep dir>...`: the results of sweeps as tables and plots, and a W&B report run.

Reads every metrics.json under the given folders. Per method and backbone it builds the dataset x shots table of
the mean +- sample std over seeds, with the average over the 11 benchmark datasets, a column counting the runs
missing from the grid, and the published numbers of the backbone beside ours, each with its source named under
the table (never beside runs on a features file). Writes `report.md`, `results.csv` (one row per method, dataset
and shots), `published.csv` (the published numbers shown, with their sources), `base_to_new.csv`, PNG plots
(accuracy vs shots, one panel per dataset plus the average, one line per method; base/new/H bars for base-to-new
runs) and, unless --no-wandb, logs them as one W&B run of job_type "report".

Nothing is averaged across different experiments: a setting of the resolved config or of the recorded protocol
flags that takes two values within one (method, backbone, dataset, shots) splits the results into separately named
series (e.g. `tip_adapter_f [protocol.selection=test]`; runs of two `protocol.task`s are always two series), and settings that differ only between datasets (a
per-dataset recipe, a leaky mode used on one dataset) are listed under the table.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import numpy as np

from clipadapt.files import write_atomic
from clipadapt.sweep import read_json, result_config

log = logging.getLogger("clipadapt.report")  # also when run as __main__

BENCHMARK = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
             "sun397", "dtd", "eurosat", "ucf101")
AVERAGE = "average"
ALL_SHOTS = (1, 2, 4, 8, 16)

# Published numbers, each with its source (shown as a footnote under every table that uses it). Only ever beside runs
# of the backbone they were measured with: runs on a features file never get any (their backbone is not RN50's).
SOURCES = {
    "protocol": "11-dataset averages, CoOp protocol, as collected in specs/protocol.md (the paper of each row is not "
                "named there)",
    "coop": "zero-shot CLIP with CoOp's hand-crafted prompt (Zhou et al., IJCV 2022), as printed in GDA (Wang et al., "
            "ICLR 2024), Table 1",
    "tip": "Tip-Adapter-F (Zhang et al., ECCV 2022), as printed in GDA (Wang et al., ICLR 2024), Table 1",
    "calip": "zero-shot CALIP (Guo et al., AAAI 2023; betas tuned on test), as printed in GDA (Wang et al., ICLR 2024), "
             "Table 1",
    "cafo": "CaFo (Zhang et al., CVPR 2023), Table 2: ImageNet, RN50",
    "cafo_zero_shot": "CaFo (Zhang et al., CVPR 2023), Table 2: ImageNet, RN50, zero-shot CLIP with CLIP's 7-template "
                      "prompt ensemble",
    "vit": "ViT-B/16 16-shot averages as collected in specs/protocol.md (the paper of each row is not named there)",
    "cocoop": "CoCoOp (Zhou et al., CVPR 2022), Table 1: base-to-new average over 11 datasets, ViT-B/16, 16 shots",
}


@dataclass(frozen=True)
class Published:
    """A published table: (method, backbone) -> {dataset or AVERAGE: {shots: accuracy}}, from one source."""

    method: str
    backbone: str
    source: str  # a key of SOURCES
    values: dict


def _zero_shot(per_dataset: dict[str, float]) -> dict:
    """A zero-shot number does not depend on the shots: the same value in every shots column."""
    return {d: dict.fromkeys(ALL_SHOTS, acc) for d, acc in per_dataset.items()}


def _per_shots(per_method: dict[str, tuple], dataset: str, source: str) -> list[Published]:
    return [Published(method, "rn50", source, {dataset: dict(zip(ALL_SHOTS, values))})
            for method, values in per_method.items()]


_AVERAGE_RN50 = {
    "coop": (59.80, 62.21, 66.84, 70.05, 73.45),
    "clip_adapter": (62.67, 65.55, 68.61, 71.40, 74.44),
    "tip_adapter": (62.33, 64.62, 66.54, 68.50, 70.32),
    "tip_adapter_f": (64.60, 66.65, 69.67, 72.45, 75.83),
    "gda": (62.19, 66.19, 69.77, 73.31, 76.05),
    "ape_t": (67.23, 69.43, 72.25, 74.47, 77.28),
}
_IMAGENET_RN50_CAFO = {
    "linear_probe": (22.17, 31.90, 41.20, 49.52, 56.13),
    "coop": (57.15, 57.81, 59.99, 61.56, 62.95),
    "clip_adapter": (61.20, 61.52, 61.84, 62.68, 63.59),
    "vt_clip": (60.53, 61.29, 62.02, 62.81, 63.92),
    "tip_adapter_f": (61.32, 61.69, 62.52, 64.00, 65.51),
    "calip_fs": (61.35, 62.03, 63.13, 64.11, 65.81),
}
_ZERO_SHOT_RN50 = dict(zip(BENCHMARK, (58.18, 86.29, 85.77, 55.61, 66.14, 77.31, 17.28, 58.52, 42.32, 37.56, 61.46)))
_CALIP_RN50 = dict(zip(BENCHMARK, (60.57, 87.71, 86.21, 56.27, 66.38, 77.42, 17.76, 58.59, 42.39, 38.90, 61.72)))
_TIP_ADAPTER_F_16_RN50 = dict(zip(BENCHMARK, (65.51, 92.86, 89.70, 75.74, 94.80, 79.43, 35.55, 71.47, 66.55, 84.54,
                                              78.03)))
PUBLISHED: list[Published] = [
    *_per_shots(_AVERAGE_RN50, AVERAGE, "protocol"),
    Published("linear_probe", "rn50", "protocol", {AVERAGE: {16: 71.10}}),
    Published("zero_shot", "rn50", "coop", _zero_shot({**_ZERO_SHOT_RN50, AVERAGE: 58.77})),
    Published("tip_adapter_f", "rn50", "tip", {d: {16: acc} for d, acc in _TIP_ADAPTER_F_16_RN50.items()}),
    Published("calip", "rn50", "calip", _zero_shot({**_CALIP_RN50, AVERAGE: 59.45})),
    *_per_shots(_IMAGENET_RN50_CAFO, "imagenet", "cafo"),
    Published("zero_shot", "rn50", "cafo_zero_shot", _zero_shot({"imagenet": 60.33})),
    Published("zero_shot", "vit_b16", "vit", {AVERAGE: dict.fromkeys(ALL_SHOTS, 64.8)}),
    *(Published(method, "vit_b16", "vit", {AVERAGE: {16: acc}})
      for method, acc in (("coop", 79.9), ("promptsrc", 82.9), ("clip_lora", 83.1), ("gallop", 84.4))),
]
# Base-to-new (ViT-B/16, 16 shots, 11-dataset average): base, new, H.
PUBLISHED_BASE_TO_NEW = {("zero_shot", "vit_b16"): (69.34, 74.22, 71.70), ("coop", "vit_b16"): (82.69, 63.22, 71.66),
                         ("cocoop", "vit_b16"): (80.47, 71.69, 75.83)}
BASE_TO_NEW_SOURCE = "cocoop"


def published(method: str, backbone: str, dataset: str, shots: int) -> tuple[tuple[float, str], ...]:
    """Every published (accuracy, source) for one cell of the tables, in the order of PUBLISHED."""
    return tuple((table.values[dataset][shots], table.source) for table in PUBLISHED
                 if (table.method, table.backbone) == (method, backbone) and shots in table.values.get(dataset, {}))


# Settings that differ between seeds by design (never a sign of two experiments mixed).
PER_SEED = {"seed", "run_name", "protocol.seed", "protocol.draw_hash", "shots", "protocol.shots"}
HEADLINE = ("protocol.task", "protocol.val_policy", "protocol.selection", "protocol.leaky", "protocol.method_fidelity")
B2N = ("base/acc", "new/acc")  # as protocols.summary writes them; H is recomputed from their means (CoCoOp's way)


class ReportError(Exception):
    """Bad input to the report (no folder, no results): the message says what to do."""


@dataclass
class Cell:
    """One finished run (one metrics.json)."""

    method: str
    backbone: str
    dataset: str
    shots: int
    seed: int
    metrics: dict
    settings: dict  # flattened result config + protocol flags, values as JSON text
    path: Path
    mtime: float


@dataclass
class Series:
    """The runs of one experiment: a method on a backbone under one set of settings, over datasets/shots/seeds."""

    method: str
    backbone: str
    variant: tuple  # ((setting, value), ...) that tells it apart from other series of the same method/backbone
    cells: dict = field(default_factory=dict)  # (dataset, shots, seed) -> Cell
    task: str = "few_shot"  # protocol.task: a series per task, named by it unless it is the default few-shot

    @property
    def name(self) -> str:
        shown = ([("protocol.task", json.dumps(self.task))] if self.task != "few_shot" else []) + list(self.variant)
        if not shown:
            return self.method
        return f"{self.method} [{', '.join(f'{k}={_short(v)}' for k, v in shown)}]"

    @property
    def base_to_new(self) -> bool:
        """Runs of the base-to-new protocol: reported as base / new / H, not as one accuracy."""
        return any(all(isinstance(c.metrics.get(m), (int, float)) for m in B2N) for c in self.cells.values())

    @property
    def from_features_file(self) -> bool:
        """Runs on a features file: their backbone is whatever made the file, never one with published numbers."""
        return any(c.backbone.startswith("features:") or
                   (c.metrics.get("config") or {}).get("dataset", {}).get("kind") == "features"
                   for c in self.cells.values())

    @property
    def leaky(self) -> bool:
        return any(c.metrics.get("protocol", {}).get("leaky") for c in self.cells.values())

    def values(self, metric: str, dataset: str, shots: int) -> dict[int, float]:
        """seed -> value of `metric` for one (dataset, shots)."""
        return {seed: float(c.metrics[metric]) for (d, k, seed), c in self.cells.items()
                if d == dataset and k == shots and isinstance(c.metrics.get(metric), (int, float))}


def _short(value_json: str) -> str:
    value = json.loads(value_json)
    if isinstance(value, (list, dict)):
        return "#" + sha256(value_json.encode()).hexdigest()[:6]
    return str(value)


def _flatten(node, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict) and node:
        flat: dict[str, str] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: json.dumps(node, sort_keys=True)}


def load_cells(folders: list[Path]) -> list[Cell]:
    """Every metrics.json under `folders` (metrics.<hash>.json of superseded configs are not results)."""
    cells: dict[tuple, Cell] = {}
    for folder in folders:
        if not folder.is_dir():
            raise ReportError(f"{folder} is not a folder: give the sweep folder(s), e.g. outputs/grid")
        for path in sorted(folder.rglob("metrics.json")):
            metrics = read_json(path)
            if not metrics or not all(k in metrics for k in ("method", "backbone", "dataset", "shots", "seed")):
                log.warning("%s is not a run's metrics.json: ignored", path)
                continue
            config = metrics.get("config") if isinstance(metrics.get("config"), dict) else {}
            settings = {**_flatten(result_config(config)), **_flatten({"protocol": metrics.get("protocol", {})})}
            settings = {k: v for k, v in settings.items() if k not in PER_SEED and k}
            cell = Cell(str(metrics["method"]), str(metrics["backbone"]), str(metrics["dataset"]),
                        int(metrics["shots"]), int(metrics["seed"]), metrics, settings, path, path.stat().st_mtime)
            key = (cell.method, cell.backbone, cell.dataset, cell.shots, cell.seed, tuple(sorted(settings.items())))
            previous = cells.get(key)
            if previous is not None:  # the same run twice (two sweep folders): the newer counts, never both
                newer, older = (cell, previous) if cell.mtime >= previous.mtime else (previous, cell)
                log.warning("the same run twice: %s and %s; using the newer, %s", older.path, newer.path, newer.path)
                cell = newer
            cells[key] = cell
    return list(cells.values())


def group_series(cells: list[Cell]) -> list[Series]:
    """Split cells into series: one per protocol task (base-to-new is reported as base / new / H), and within it a
    setting varying within one (method, backbone, dataset, shots) is a variant."""
    by_pair: dict[tuple, list[Cell]] = defaultdict(list)
    for cell in cells:
        by_pair[(cell.method, cell.backbone, json.loads(cell.settings.get("protocol.task", '"few_shot"')))].append(cell)
    series: list[Series] = []
    few_shot_first = lambda item: (*item[0][:2], item[0][2] != "few_shot", item[0][2])  # noqa: E731
    for (method, backbone, task), pair_cells in sorted(by_pair.items(), key=few_shot_first):
        groups: dict[tuple, list[Cell]] = defaultdict(list)
        for cell in pair_cells:
            groups[(cell.dataset, cell.shots)].append(cell)
        keys = sorted({k for cell in pair_cells for k in cell.settings})
        variant_keys = [k for k in keys
                        if any(len({c.settings.get(k) for c in group}) > 1 for group in groups.values())]
        # a series is named by its values that differ from the most common one (the main series keeps its name)
        common = {k: Counter(c.settings.get(k, "null") for c in pair_cells).most_common(1)[0][0] for k in variant_keys}
        by_variant: dict[tuple, Series] = {}
        for cell in pair_cells:
            values = tuple((k, cell.settings.get(k, "null")) for k in variant_keys)
            shown = tuple((k, v) for k, v in values if v != common[k])
            one = by_variant.setdefault(values, Series(method, backbone, shown, task=task))
            one.cells[(cell.dataset, cell.shots, cell.seed)] = cell
        series.extend(sorted(by_variant.values(), key=lambda one: one.variant))
    return series


@dataclass
class Grid:
    """The grid every series is measured against: rows, shots columns, seeds expected in each cell."""

    datasets: list[str]
    average_over: list[str]
    shots: list[int]
    seeds: list[int]

    @classmethod
    def of(cls, cells: list[Cell], shots: list[int] | None = None, seeds: list[int] | None = None) -> "Grid":
        seen = sorted({c.dataset for c in cells})
        benchmark = any(d in BENCHMARK for d in seen)
        others = [d for d in seen if d not in BENCHMARK]
        datasets = [*BENCHMARK, *others] if benchmark else others
        return cls(datasets, list(BENCHMARK) if benchmark else others,
                   sorted(shots or {c.shots for c in cells}), sorted(seeds or {c.seed for c in cells}))


class Footnotes:
    """The sources of the published numbers in one table: a mark each, in order of first use, listed under it."""

    MARKS = "ᵃᵇᶜᵈᵉᶠᵍʰ"

    def __init__(self):
        self.used: list[str] = []

    def mark(self, source: str) -> str:
        if source not in self.used:
            self.used.append(source)
        return self.MARKS[self.used.index(source)]

    def legend(self) -> list[str]:
        if not self.used:
            return []
        return ["Published, in brackets: " + "; ".join(f"{self.MARKS[i]} {SOURCES[source]}"
                                                       for i, source in enumerate(self.used)) + ".", ""]


@dataclass
class Stat:
    mean: float | None
    std: float | None  # sample std over seeds (ddof=1); None with fewer than 2 seeds
    n: int  # seeds (or datasets, for the average) that went into the mean
    of: int  # how many were expected
    published: tuple = ()  # ((accuracy, source), ...)

    def text(self, footnotes: Footnotes | None = None, digits: int = 2) -> str:
        if self.mean is None:
            return "–"
        text = f"{self.mean:.{digits}f}" + ("" if self.std is None else f" ± {self.std:.{digits}f}")
        if self.n < self.of:
            text += f" ({self.n}/{self.of})"
        if self.published:
            sources: dict[float, list[str]] = defaultdict(list)  # one value from two sources is shown once
            for value, source in self.published:
                sources[value].append(source)
            marks = lambda names: "".join(footnotes.mark(s) for s in names) if footnotes else ""  # noqa: E731
            text += " [" + " ".join(f"{value:.2f}{marks(names)}" for value, names in sources.items()) + "]"
        return text


def _stat(values: list[float], of: int, published: tuple = ()) -> Stat:
    if not values:
        return Stat(None, None, 0, of, published)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return Stat(float(np.mean(values)), std, len(values), of, published)


def _published(series: Series, dataset: str, shots: int, metric: str) -> tuple:
    if metric != "test/acc" or series.from_features_file:
        return ()
    return published(series.method, series.backbone, dataset, shots)


def dataset_stat(series: Series, grid: Grid, metric: str, dataset: str, shots: int) -> Stat:
    per_seed = series.values(metric, dataset, shots)
    values = [per_seed[s] for s in grid.seeds if s in per_seed]
    return _stat(values, len(grid.seeds), _published(series, dataset, shots, metric))


def average_stat(series: Series, grid: Grid, metric: str, shots: int) -> Stat:
    """Mean over the benchmark datasets of their seed means; std over seeds of the per-seed dataset averages (only
    with every dataset present for those seeds); (k/11) marks an average over fewer datasets."""
    per_dataset = {d: series.values(metric, d, shots) for d in grid.average_over}
    means = [float(np.mean([v[s] for s in grid.seeds if s in v])) for v in per_dataset.values()
             if any(s in v for s in grid.seeds)]
    complete_seeds = [s for s in grid.seeds if all(s in v for v in per_dataset.values())]
    per_seed_average = [float(np.mean([v[s] for v in per_dataset.values()])) for s in complete_seeds]
    published = _published(series, AVERAGE, shots, metric)
    if not means:
        return Stat(None, None, 0, len(grid.average_over), published)
    complete = len(means) == len(grid.average_over) and len(per_seed_average) > 1
    std = float(np.std(per_seed_average, ddof=1)) if complete else None
    return Stat(float(np.mean(means)), std, len(means), len(grid.average_over), published)


def missing_runs(series: Series, grid: Grid, metric: str, dataset: str) -> int:
    return sum(s not in series.values(metric, dataset, k) for k in grid.shots for s in grid.seeds)


def protocol_notes(series: Series, grid: Grid) -> tuple[str, list[str]]:
    """A one-line protocol summary, and a note per setting that differs between datasets of the series."""
    values: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))  # setting -> value -> datasets
    for cell in series.cells.values():
        for key, value in cell.settings.items():
            values[key][value].add(cell.dataset)
    headline = []
    for key in HEADLINE:
        if key in values:
            shown = " / ".join(_short(v) for v in sorted(values[key]))
            headline.append(f"{key.split('.', 1)[1]}={shown}")
    notes = []
    for key in sorted(values):
        per_dataset_by_design = key.startswith("dataset.") or key in ("protocol.templates", "protocol.split_hash")
        if len(values[key]) > 1 and not per_dataset_by_design:
            spread = "; ".join(f"{_short(v)} ({', '.join(sorted(ds))})" for v, ds in sorted(values[key].items()))
            notes.append(f"`{key}` differs between datasets: {spread}")
    return " · ".join(headline), notes


def base_to_new_stats(series: Series, grid: Grid, dataset: str | None, shots: int) -> tuple[Stat, Stat, Stat]:
    """Base, new and H (the harmonic mean of the mean base and mean new accuracy, as CoCoOp and SHIP report it)."""
    if dataset is None:
        base, new = (average_stat(series, grid, m, shots) for m in B2N)
    else:
        base, new = (dataset_stat(series, grid, m, dataset, shots) for m in B2N)
    h = None
    if base.mean is not None and new.mean is not None and base.mean + new.mean > 0:
        h = 2 * base.mean * new.mean / (base.mean + new.mean)
    return base, new, Stat(h, None, min(base.n, new.n), base.of)


# ---------------------------------------------------------------------------------------------------- outputs


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def build_report(series: list[Series], grid: Grid, sources: list[Path]) -> tuple[str, dict[str, list[list]], dict]:
    """Markdown text, the CSV rows by table (accuracy, the published numbers shown beside it, base-to-new), and
    headline numbers for W&B."""
    seeds = ",".join(map(str, grid.seeds))
    out = ["# Results", "",
           f"From {', '.join(str(s) for s in sources)}. Cells: mean ± sample std over seeds {seeds}; "
           f"(n/{len(grid.seeds)}): seeds present; –: no run; [x]: published, its source under the table. Average: over the "
           f"{len(grid.average_over)} {'benchmark ' if grid.average_over == list(BENCHMARK) else ''}"
           f"dataset{'s' * (len(grid.average_over) > 1)}, "
           f"(k/{len(grid.average_over)}) when some are missing (not comparable with a published average). "
           "`missing`: runs of the row's grid (shots x seeds) with no result.", ""]
    acc_rows: list[list] = []
    published_rows: list[list] = []
    b2n_rows: list[list] = []
    summary: dict = {}
    for one in series:
        headline, notes = protocol_notes(one, grid)
        has_b2n = one.base_to_new
        has_acc = not has_b2n and any(isinstance(c.metrics.get("test/acc"), (int, float)) for c in one.cells.values())
        out += [f"## {one.name} · {one.backbone}" + (" · LEAKY (not the honest protocol)" if one.leaky else ""), "",
                f"protocol: {headline}" if headline else "protocol: (not recorded)", ""]
        if has_acc:
            header = ["dataset", *(f"{k} shot{'s' * (k > 1)}" for k in grid.shots), "missing"]
            rows, footnotes = [], Footnotes()
            for dataset in [*grid.datasets, AVERAGE]:
                if dataset == AVERAGE:
                    stats = [average_stat(one, grid, "test/acc", k) for k in grid.shots]
                    rows.append([f"**average ({len(grid.average_over)})**",
                                 *(f"**{s.text(footnotes)}**" for s in stats), ""])
                    summary.update({f"{one.backbone}/{one.name}/average/{k}shot": s.mean
                                    for k, s in zip(grid.shots, stats) if s.mean is not None and s.n == s.of})
                else:
                    stats = [dataset_stat(one, grid, "test/acc", dataset, k) for k in grid.shots]
                    missing = f"{missing_runs(one, grid, 'test/acc', dataset)}/{len(grid.shots) * len(grid.seeds)}"
                    rows.append([dataset, *(s.text(footnotes) for s in stats), missing])
                acc_rows += [[one.method, one.backbone, one.name, dataset, k, s.mean, s.std, s.n, s.of]
                             for k, s in zip(grid.shots, stats)]
                published_rows += [[one.method, one.backbone, one.name, dataset, k, value, SOURCES[source]]
                                   for k, s in zip(grid.shots, stats) if s.mean is not None
                                   for value, source in s.published]
            out += [_markdown_table(header, rows), "", *footnotes.legend()]
        if has_b2n:
            published = None if one.from_features_file else PUBLISHED_BASE_TO_NEW.get((one.method, one.backbone))
            shots = [k for k in grid.shots if any(one.values(B2N[0], d, k) for d in grid.datasets)]
            header = ["dataset", *(f"{k}-shot {m}" for k in shots for m in ("base", "new", "H"))]
            rows = []
            for dataset in [*grid.datasets, None]:
                triples = [base_to_new_stats(one, grid, dataset, k) for k in shots]
                label = dataset or f"**average ({len(grid.average_over)})**"
                rows.append([label, *(s.text() for triple in triples for s in triple)])
                b2n_rows += [[one.method, one.backbone, one.name, dataset or AVERAGE, k, *(s.mean for s in triple)]
                             for k, triple in zip(shots, triples)]
            out += ["base-to-new (H of the mean base and new accuracy):", "", _markdown_table(header, rows), ""]
            if published:
                out += [f"published ({SOURCES[BASE_TO_NEW_SOURCE]}): base {published[0]}, new {published[1]}, "
                        f"H {published[2]}", ""]
        out += [f"- {note}" for note in notes] + ([""] if notes else [])
    tables = {"results": acc_rows, "published": published_rows, "base_to_new": b2n_rows}
    return "\n".join(out), tables, summary


COLUMNS = {
    "results": ["method", "backbone", "series", "dataset", "shots", "mean", "std", "n", "of"],
    "published": ["method", "backbone", "series", "dataset", "shots", "published", "source"],
    "base_to_new": ["method", "backbone", "series", "dataset", "shots", "base", "new", "h"],
}


def _write_csv(path: Path, columns: list[str], rows: list[list]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows([["" if v is None else (round(v, 4) if isinstance(v, float) else v) for v in row] for row in rows])
    write_atomic(path, lambda tmp: tmp.write_text(buffer.getvalue()))


def _panels(count: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.9 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return plt, figure, list(axes.flat[:count])


def _save(plt, figure, path: Path, bottom_in: float = 0.5) -> None:
    height = figure.get_figheight()  # margins in inches, so one row and three rows both fit (tight_layout is slow)
    figure.subplots_adjust(left=0.07, right=0.98, top=1 - 0.55 / height, bottom=bottom_in / height, hspace=0.55,
                           wspace=0.28)
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


def plot_accuracy_vs_shots(series: list[Series], grid: Grid, backbone: str, path: Path) -> None:
    """One panel per dataset plus the average; one line per series (mean ± std over seeds); x: published."""
    lines = [s for s in series if s.backbone == backbone and not s.base_to_new]
    datasets = [d for d in grid.datasets if any(s.values("test/acc", d, k) for s in lines for k in grid.shots)]
    plt, figure, axes = _panels(len(datasets) + 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, dataset in zip(axes, [*datasets, AVERAGE]):
        for i, one in enumerate(lines):
            color = colors[i % len(colors)]
            stats = [average_stat(one, grid, "test/acc", k) if dataset == AVERAGE else
                     dataset_stat(one, grid, "test/acc", dataset, k) for k in grid.shots]
            points = [(k, s) for k, s in zip(grid.shots, stats) if s.mean is not None]
            if points:
                ax.errorbar([k for k, _ in points], [s.mean for _, s in points], yerr=[s.std or 0 for _, s in points],
                            marker="o", markersize=3, capsize=2, color=color, label=one.name)
            published = [(k, value) for k, s in zip(grid.shots, stats) for value, _ in s.published]
            if published:
                ax.plot(*zip(*published), "x", color=color, markersize=6)
        ax.set_title(f"{AVERAGE} ({len(grid.average_over)})" if dataset == AVERAGE else dataset, fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(grid.shots, [str(k) for k in grid.shots])
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)", fontsize=8)
    axes[-1].set_xlabel("shots per class (x: published)", fontsize=8)
    axes[-1].legend(fontsize=6, loc="best")
    figure.suptitle(f"accuracy vs shots · {backbone}", fontsize=10)
    _save(plt, figure, path)


def plot_base_to_new(series: list[Series], grid: Grid, backbone: str, shots: int, path: Path) -> None:
    """One panel per dataset plus the average; per series three bars: base, new, H."""
    bars = [s for s in series if s.backbone == backbone and s.base_to_new]
    datasets = [d for d in grid.datasets if any(s.values(B2N[0], d, shots) for s in bars)]
    plt, figure, axes = _panels(len(datasets) + 1)
    width = 0.8 / 3
    for ax, dataset in zip(axes, [*datasets, None]):
        triples = [base_to_new_stats(one, grid, dataset, shots) for one in bars]
        positions = np.arange(len(bars))
        for j, label in enumerate(("base", "new", "H")):
            heights = [t[j].mean or 0 for t in triples]
            ax.bar(positions + (j - 1) * width, heights, width, label=label)
        ax.set_xticks(positions, [one.name for one in bars], rotation=30, ha="right", fontsize=6)
        ax.set_title(dataset or f"{AVERAGE} ({len(grid.average_over)})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy (%)", fontsize=8)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="upper right", ncol=3, fontsize=7)
    figure.suptitle(f"base-to-new · {backbone} · {shots} shots", fontsize=10)
    _save(plt, figure, path, bottom_in=0.8)


def write_report(folders: list[Path], out: Path, shots: list[int] | None = None, seeds: list[int] | None = None,
                 wandb_cfg=None, plots: bool = True) -> dict[str, Path]:
    """Build everything from the sweep folders into `out`; returns the files written by name."""
    cells = load_cells(folders)
    if not cells:
        raise ReportError(f"no metrics.json under {', '.join(map(str, folders))}: run a sweep first "
                          "(python -m clipadapt.train -m +sweep=grid method=...)")
    grid = Grid.of(cells, shots, seeds)
    series = group_series(cells)
    markdown, tables, summary = build_report(series, grid, folders)
    out.mkdir(parents=True, exist_ok=True)
    files = {"report.md": out / "report.md"}
    write_atomic(files["report.md"], lambda tmp: tmp.write_text(markdown))
    tables = {name: rows for name, rows in tables.items() if rows or name == "results"}
    for name, rows in tables.items():
        files[f"{name}.csv"] = out / f"{name}.csv"
        _write_csv(files[f"{name}.csv"], COLUMNS[name], rows)
    for backbone in sorted({s.backbone for s in series}) if plots else []:
        mine = [s for s in series if s.backbone == backbone]
        in_name = backbone.replace(":", "-")  # features:<stem>: no colon in a file name
        if any(s.values("test/acc", d, k) for s in mine if not s.base_to_new
               for d in grid.datasets for k in grid.shots):
            name = f"accuracy_vs_shots_{in_name}.png"
            files[name] = out / name
            plot_accuracy_vs_shots(mine, grid, backbone, files[name])
        for k in grid.shots:
            if any(s.values(B2N[0], d, k) for s in mine if s.base_to_new for d in grid.datasets):
                name = f"base_to_new_{in_name}_{k}shot.png"
                files[name] = out / name
                plot_base_to_new(mine, grid, backbone, k, files[name])
    if wandb_cfg is not None:
        from clipadapt.tracking import log_report_run

        images = {name.removesuffix(".png"): path for name, path in files.items() if name.endswith(".png")}
        log_report_run(wandb_cfg, "report", {"sweeps": [str(f) for f in folders], "seeds": grid.seeds,
                                             "shots": grid.shots, "cells": len(cells)},
                       out, {name: (COLUMNS[name], rows) for name, rows in tables.items()}, images, summary, markdown)
    log.info("report of %d runs (%d series) written to %s", len(cells), len(series), out)
    return files


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipadapt.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep folders (searched recursively for metrics.json)")
    parser.add_argument("--out", type=Path, help="where to write (default: <first sweep folder>/report)")
    parser.add_argument("--shots", type=_ints, help="shots columns (default: every K found)")
    parser.add_argument("--seeds", type=_ints, help="seeds expected in each cell (default: every seed found)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B")
    parser.add_argument("--wandb-project", default="clipadapt")
    parser.add_argument("--wandb-entity", default=None)
    parser.add_argument("--wandb-mode", default=None,
                        help="online | offline | disabled (default: offline without an API key)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("clipadapt").setLevel(logging.INFO)
    from types import SimpleNamespace

    wandb_cfg = None if args.no_wandb else SimpleNamespace(project=args.wandb_project, entity=args.wandb_entity,
                                                           mode=args.wandb_mode)
    try:
        files = write_report(args.sweeps, args.out or args.sweeps[0] / "report", args.shots, args.seeds, wandb_cfg,
                             plots=not args.no_plots)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(str(path) for path in files.values()))
    return 0



if __name__ == "__main__":
    sys.exit(main())
