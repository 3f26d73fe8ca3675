"""The results report on fabricated sweep folders: numbers, the 11-dataset average, missing cells, protocol variants
kept apart, base-to-new, valid PNG plots, the W&B report run and the CLI's errors."""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path

from types import SimpleNamespace

import pytest
from PIL import Image

from clipadapt import report
from clipadapt.report import BENCHMARK, main, write_report


def accuracy(method: str, dataset: str, shots: int, seed: int) -> float:
    return 40 + 2.5 * BENCHMARK.index(dataset) + shots / 2 + 0.75 * seed + (3 if method == "tip_adapter_f" else 0)


def write_cell(sweep: Path, method: str, backbone: str, dataset: str, shots: int, seed: int, *,
               selection: str = "last", extra: dict | None = None, acc: float | None = None) -> Path:
    folder = sweep / method / backbone / dataset / f"{shots}shot" / f"seed{seed}"
    folder.mkdir(parents=True)
    protocol = {"val_policy": "few_shot", "selection": selection, "leaky": selection == "test", "task": "few_shot",
                "templates": [f"a photo of a {{}} ({dataset})."], "seed": seed, "shots": shots,
                "split_hash": f"split-{dataset}", "draw_hash": f"draw-{dataset}-{shots}-{seed}",
                "method_fidelity": "as published"}
    config = {"method": {"name": method, "alpha": 1.0}, "backbone": {"name": backbone}, "dataset": {"name": dataset},
              "shots": shots, "seed": seed, "run_name": f"{method}-{dataset}-{shots}s-{backbone}-s{seed}",
              "protocol": {"val_policy": "few_shot", "selection": selection, "task": "few_shot"},
              "logger": {"name": "wandb"}, "paths": {"root": f"/somewhere/{seed}"}}
    metrics = {"method": method, "backbone": backbone, "dataset": dataset, "shots": shots, "seed": seed,
               "test/acc": accuracy(method, dataset, shots, seed) if acc is None else acc,
               "protocol": protocol, "config": config, **(extra or {})}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.fixture
def sweep(tmp_path) -> Path:
    """tip_adapter_f/rn50 complete (11 datasets x 1,16 shots x 3 seeds); zero_shot/rn50 partial; one leaky rerun;
    base-to-new coop/vit_b16 on two datasets; plus files that are not results."""
    root = tmp_path / "grid"
    for dataset in BENCHMARK:
        for shots in (1, 16):
            for seed in (1, 2, 3):
                write_cell(root, "tip_adapter_f", "rn50", dataset, shots, seed)
    for dataset, seeds in (("eurosat", (1, 2)), ("dtd", (1, 2, 3))):
        for seed in seeds:
            write_cell(root, "zero_shot", "rn50", dataset, 1, seed)
    leaky = tmp_path / "leaky"  # the same cell under the leaky selection: its own series, never averaged in
    write_cell(leaky, "tip_adapter_f", "rn50", "eurosat", 16, 1, selection="test", acc=99.0)
    for dataset in ("eurosat", "dtd"):
        for seed in (1, 2, 3):
            base, new = 80.0 + seed, 60.0 + seed + (dataset == "dtd")
            write_cell(root, "coop", "vit_b16", dataset, 16, seed,
                       extra={"test/base_acc": base, "test/new_acc": new, "test/h": 2 * base * new / (base + new)})
    superseded = root / "tip_adapter_f" / "rn50" / "eurosat" / "16shot" / "seed1" / "metrics.0123abcd.json"
    superseded.write_text(json.dumps({"method": "tip_adapter_f", "backbone": "rn50", "dataset": "eurosat",
                                      "shots": 16, "seed": 1, "test/acc": 0.0}))
    (root / "broken").mkdir()
    (root / "broken" / "metrics.json").write_text("{not json")
    return tmp_path


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def find(table: list[dict], **match) -> dict:
    hits = [row for row in table if all(row[k] == str(v) for k, v in match.items())]
    assert len(hits) == 1, (match, hits)
    return hits[0]


def test_report_numbers_average_missing_and_variants(sweep, tmp_path):
    out = tmp_path / "report"
    files = write_report([sweep / "grid", sweep / "leaky"], out, plots=False)
    results = rows(files["results.csv"])

    values = [accuracy("tip_adapter_f", "eurosat", 16, s) for s in (1, 2, 3)]
    row = find(results, series="tip_adapter_f", dataset="eurosat", shots=16)
    assert float(row["mean"]) == pytest.approx(statistics.mean(values), abs=1e-4)
    assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=1e-4)  # the superseded file is ignored
    assert (row["n"], row["of"], row["published"]) == ("3", "3", "84.54")

    per_dataset = {d: statistics.mean(accuracy("tip_adapter_f", d, 16, s) for s in (1, 2, 3)) for d in BENCHMARK}
    per_seed = [statistics.mean(accuracy("tip_adapter_f", d, 16, s) for d in BENCHMARK) for s in (1, 2, 3)]
    average = find(results, series="tip_adapter_f", dataset="average", shots=16)
    assert float(average["mean"]) == pytest.approx(statistics.mean(per_dataset.values()), abs=1e-4)
    assert float(average["std"]) == pytest.approx(statistics.stdev(per_seed), abs=1e-4)
    assert (average["n"], average["of"], average["published"]) == ("11", "11", "75.83")

    # zero_shot ran on 2 of the 11 datasets: the average says so, and the missing column counts the runs
    partial = find(results, series="zero_shot", dataset="average", shots=1)
    assert (partial["n"], partial["of"]) == ("2", "11") and partial["published"] == "58.77"
    assert float(partial["mean"]) == pytest.approx(statistics.mean(
        [statistics.mean([accuracy("zero_shot", "eurosat", 1, s) for s in (1, 2)]),
         statistics.mean([accuracy("zero_shot", "dtd", 1, s) for s in (1, 2, 3)])]), abs=1e-4)
    assert find(results, series="zero_shot", dataset="imagenet", shots=1)["mean"] == ""
    assert find(results, series="zero_shot", dataset="eurosat", shots=1)["n"] == "2"

    # the leaky rerun is its own series, named by the settings that differ, and flagged
    leaky = [r for r in results if "protocol.selection=test" in r["series"]]
    assert {r["dataset"] for r in leaky if r["mean"]} == {"eurosat", "average"}
    assert float(find(leaky, dataset="eurosat", shots=16)["mean"]) == 99.0

    text = (out / "report.md").read_text()
    assert "## tip_adapter_f · rn50\n" in text and "LEAKY" in text and "selection=test" in text
    assert "protocol: task=few_shot · val_policy=few_shot · selection=last · leaky=False" in text
    zero_shot = text.split("## zero_shot · rn50")[1].split("##")[0]
    assert "| imagenet | – | – | 6/6 |" in zero_shot and "| eurosat |" in zero_shot and "(2/3) [37.56]" in zero_shot
    assert "(2/11) [58.77]" in zero_shot and "| dtd |" in zero_shot and "| dtd | " in zero_shot
    assert "3/6 |" in zero_shot.split("| dtd |")[1].splitlines()[0]


def test_report_base_to_new(sweep, tmp_path):
    files = write_report([sweep / "grid"], tmp_path / "report", plots=False)
    b2n = rows(files["base_to_new.csv"])
    average = find(b2n, series="coop", dataset="average", shots=16)
    base = statistics.mean([80.0 + s for s in (1, 2, 3)])
    new = statistics.mean([statistics.mean([60.0 + s, 61.0 + s]) for s in (1, 2, 3)])
    assert float(average["base"]) == pytest.approx(base, abs=1e-4)
    assert float(average["new"]) == pytest.approx(new, abs=1e-4)
    assert float(average["h"]) == pytest.approx(2 * base * new / (base + new), abs=1e-4)  # H of the means
    assert "published (ViT-B/16, 16 shots, average): base 82.69, new 63.22, H 71.66" in files["report.md"].read_text()
    assert not [name for name in files if name.endswith(".png")]


def test_plots_and_the_wandb_report_run(sweep, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("clipadapt.wandb_logger.log_report", lambda *args: seen.update(args=args))
    wandb_cfg = SimpleNamespace(project="p", entity=None, mode=None)
    files = write_report([sweep / "grid"], tmp_path / "report", wandb_cfg=wandb_cfg)
    pngs = sorted(name for name in files if name.endswith(".png"))
    assert pngs == ["accuracy_vs_shots_rn50.png", "base_to_new_vit_b16_16shot.png"]  # vit_b16: base-to-new only
    for name in pngs:
        with Image.open(files[name]) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200

    project, entity, mode, name, config, directory, tables, images, summary, markdown = seen["args"]
    assert (project, name, config["cells"]) == ("p", "report", 66 + 5 + 6)
    assert set(tables) == {"results", "base_to_new"} and images == {name[:-4]: files[name] for name in pngs}
    assert summary["rn50/tip_adapter_f/average/16shot"] == pytest.approx(
        statistics.mean(accuracy("tip_adapter_f", d, 16, s) for d in BENCHMARK for s in (1, 2, 3)))
    assert "rn50/zero_shot/average/1shot" not in summary  # an average over 2 of 11 datasets is no headline

    monkeypatch.undo()  # the real wandb code path, as a no-op run
    assert report.write_report([sweep / "grid"], tmp_path / "again", plots=False,
                               wandb_cfg=SimpleNamespace(project="p", entity=None, mode="disabled"))


def test_the_same_run_in_two_sweeps_counts_once(sweep, tmp_path):
    copy = tmp_path / "copy"
    newer = write_cell(copy, "tip_adapter_f", "rn50", "eurosat", 16, 1,
                       acc=accuracy("tip_adapter_f", "eurosat", 16, 1) + 1)
    later = (newer / "metrics.json").stat().st_mtime + 60
    os.utime(newer / "metrics.json", (later, later))
    files = write_report([sweep / "grid", copy], tmp_path / "report", plots=False)
    row = find(rows(files["results.csv"]), series="tip_adapter_f", dataset="eurosat", shots=16)
    values = [accuracy("tip_adapter_f", "eurosat", 16, s) for s in (1, 2, 3)]
    values[0] += 1  # the newer copy replaces seed 1; it is not a fourth seed
    assert row["n"] == "3" and float(row["mean"]) == pytest.approx(statistics.mean(values), abs=1e-4)


def test_cli(sweep, tmp_path, capsys):
    out = ["--out", str(tmp_path / "r")]
    assert main([str(sweep / "grid"), *out, "--no-wandb", "--no-plots", "--seeds", "1,2,3,4"]) == 0
    assert (tmp_path / "r" / "report.md").is_file() and "results.csv" in capsys.readouterr().out
    assert "(3/4)" in (tmp_path / "r" / "report.md").read_text()  # seed 4 expected, never run
    assert main([str(tmp_path / "nowhere"), "--no-wandb"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--no-wandb"]) == 2
    assert "no metrics.json" in capsys.readouterr().err
