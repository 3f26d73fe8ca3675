"""The results report: numbers, the 11-dataset average, missing cells, protocol variants kept apart, published numbers
with their sources, valid PNG plots, the W&B report run and the CLI's errors on fabricated sweep folders; base-to-new
and features-file runs on metrics.json files written by real runs."""

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
from clipadapt.run import run


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
    coop/vit_b16 on two datasets; plus files that are not results."""
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
            write_cell(root, "coop", "vit_b16", dataset, 16, seed)
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
    assert (row["n"], row["of"]) == ("3", "3")
    published = rows(files["published.csv"])
    assert find(published, series="tip_adapter_f", dataset="eurosat", shots=16)["published"] == "84.54"

    per_dataset = {d: statistics.mean(accuracy("tip_adapter_f", d, 16, s) for s in (1, 2, 3)) for d in BENCHMARK}
    per_seed = [statistics.mean(accuracy("tip_adapter_f", d, 16, s) for d in BENCHMARK) for s in (1, 2, 3)]
    average = find(results, series="tip_adapter_f", dataset="average", shots=16)
    assert float(average["mean"]) == pytest.approx(statistics.mean(per_dataset.values()), abs=1e-4)
    assert float(average["std"]) == pytest.approx(statistics.stdev(per_seed), abs=1e-4)
    assert (average["n"], average["of"]) == ("11", "11")
    assert find(published, series="tip_adapter_f", dataset="average", shots=16)["published"] == "75.83"

    # zero_shot ran on 2 of the 11 datasets: the average says so, and the missing column counts the runs
    partial = find(results, series="zero_shot", dataset="average", shots=1)
    assert (partial["n"], partial["of"]) == ("2", "11")
    assert find(published, series="zero_shot", dataset="average", shots=1)["published"] == "58.77"
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
    assert "| imagenet | – | – | 6/6 |" in zero_shot and "| eurosat |" in zero_shot and "(2/3) [37.56ᵃ]" in zero_shot
    assert "(2/11) [58.77ᵃ]" in zero_shot and "| dtd |" in zero_shot and "| dtd | " in zero_shot
    assert "Published, in brackets: ᵃ zero-shot CLIP with CoOp's hand-crafted prompt" in zero_shot
    assert "3/6 |" in zero_shot.split("| dtd |")[1].splitlines()[0]


def test_published_numbers_name_their_sources(tmp_path):
    """CALIP's zero-shot row and CaFo's ImageNet rows beside RN50 runs, each number marked with its source."""
    for shots in (1, 2, 16):
        write_cell(tmp_path, "coop", "rn50", "imagenet", shots, 1, acc=60.0)
        write_cell(tmp_path, "zero_shot", "rn50", "imagenet", shots, 1, acc=59.0)
    write_cell(tmp_path, "calip", "rn50", "eurosat", 1, 1, acc=40.0)
    write_cell(tmp_path, "calip_fs", "vit_b16", "imagenet", 16, 1, acc=70.0)  # CaFo's rows are RN50's
    files = write_report([tmp_path], tmp_path / "report", plots=False)
    published = rows(files["published.csv"])
    cafo = "CaFo (Zhang et al., CVPR 2023), Table 2: ImageNet, RN50"
    assert {(r["shots"], r["published"], r["source"]) for r in published
            if r["series"] == "coop" and r["dataset"] == "imagenet"} == {
        ("1", "57.15", cafo), ("2", "57.81", cafo), ("16", "62.95", cafo)}
    zero_shot = {(r["published"], r["source"]) for r in published
                 if r["series"] == "zero_shot" and r["dataset"] == "imagenet" and r["shots"] == "1"}
    assert zero_shot == {("58.18", report.SOURCES["coop"]), ("60.33", f"{cafo}, zero-shot CLIP with CLIP's 7-template "
                                                                      "prompt ensemble")}
    calip = find(published, series="calip", dataset="eurosat", shots=1)
    assert calip["published"] == "38.9" and "zero-shot CALIP (Guo et al., AAAI 2023" in calip["source"]
    assert find(published, series="calip", dataset="average", shots=1)["published"] == "59.45"
    assert not [r for r in published if r["backbone"] == "vit_b16"]

    text = (tmp_path / "report" / "report.md").read_text()
    table = text.split("## zero_shot · rn50")[1]
    assert "| imagenet | 59.00 [58.18ᵃ 60.33ᵇ] | 59.00 [58.18ᵃ 60.33ᵇ] | 59.00 [58.18ᵃ 60.33ᵇ] | 0/3 |" in table
    legend = table.split("Published, in brackets: ")[1].splitlines()[0]
    assert legend.startswith("ᵃ zero-shot CLIP with CoOp's hand-crafted prompt") and f"; ᵇ {cafo}, zero-shot" in legend
    coop = text.split("## coop · rn50")[1].split("##")[0]
    assert "[57.15ᵃ]" in coop and "[59.80ᵇ]" in coop and "ᵇ 11-dataset averages, CoOp protocol" in coop


def real_cell(tiny_config, sweep: Path, *overrides: str) -> dict:
    """One cell run for real (tiny model, synthetic images) into the sweep folder; its metrics."""
    folder = sweep / "-".join(o.replace("=", "_").replace("/", "_") for o in overrides)
    return run(tiny_config(*overrides), folder)


def test_report_of_real_base_to_new_runs(tiny_config, tmp_path):
    """Base / new / H reach the report from the names runs write; few-shot runs of the method stay their own series."""
    sweep = tmp_path / "sweep"
    common = ("method=tip_adapter", "shots=2")
    b2n = [real_cell(tiny_config, sweep, *common, "protocol.task=base_to_new", f"seed={seed}") for seed in (1, 2)]
    few_shot = real_cell(tiny_config, sweep, *common, "seed=1")
    files = write_report([sweep], tmp_path / "report")

    base = statistics.mean(m["base/acc"] for m in b2n)
    new = statistics.mean(m["new/acc"] for m in b2n)
    row = find(rows(files["base_to_new.csv"]), dataset="synthetic", shots=2)
    assert row["series"] == "tip_adapter [protocol.task=base_to_new]"
    assert float(row["base"]) == pytest.approx(base, abs=1e-3) and float(row["new"]) == pytest.approx(new, abs=1e-3)
    assert float(row["h"]) == pytest.approx(2 * base * new / (base + new), abs=1e-3)  # H of the means
    assert {m["test/acc"] for m in b2n} == {m["H"] for m in b2n}  # a run's headline is its own H

    results = rows(files["results.csv"])
    assert float(find(results, series="tip_adapter", dataset="synthetic", shots=2)["mean"]) == pytest.approx(
        few_shot["test/acc"], abs=1e-3)
    assert not [r for r in results if "base_to_new" in r["series"]]  # H is not filed as a few-shot accuracy
    text = files["report.md"].read_text()
    assert "## tip_adapter [protocol.task=base_to_new] · tiny" in text and "| 2-shot base | 2-shot new | 2-shot H |" in text
    with Image.open(files["base_to_new_tiny_2shot.png"]) as image:
        image.verify()


def test_features_file_runs_get_no_published_numbers(tiny_config, tmp_path):
    """A run on a features file is not a run of the backbone named in the config: nothing published beside it."""
    import numpy as np

    rng = np.random.default_rng(0)
    path = tmp_path / "feats.npz"
    np.savez(path, train_features=rng.normal(size=(20, 8)), train_labels=np.repeat(np.arange(4), 5),
             test_features=rng.normal(size=(12, 8)), test_labels=np.repeat(np.arange(4), 3),
             text_features=rng.normal(size=(4, 8)))
    for task in ("few_shot", "base_to_new"):
        real_cell(tiny_config, tmp_path / "sweep", "backbone=rn50", "method=zero_shot", "dataset=features",
                  f"dataset.path={path}", "shots=1", f"protocol.task={task}")
    files = write_report([tmp_path / "sweep"], tmp_path / "report", plots=False)
    assert "published.csv" not in files and "[" not in files["results.csv"].read_text()
    text = files["report.md"].read_text()
    assert "Published, in brackets" not in text and "published (" not in text
    table_rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table_rows) >= 4 and not [line for line in table_rows if "[" in line]


def test_plots_and_the_wandb_report_run(sweep, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("clipadapt.wandb_logger.log_report", lambda *args: seen.update(args=args))
    wandb_cfg = SimpleNamespace(project="p", entity=None, mode=None)
    files = write_report([sweep / "grid"], tmp_path / "report", wandb_cfg=wandb_cfg)
    pngs = sorted(name for name in files if name.endswith(".png"))
    assert pngs == ["accuracy_vs_shots_rn50.png", "accuracy_vs_shots_vit_b16.png"]
    for name in pngs:
        with Image.open(files[name]) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200

    project, entity, mode, name, config, directory, tables, images, summary, markdown = seen["args"]
    assert (project, name, config["cells"]) == ("p", "report", 66 + 5 + 6)
    assert set(tables) == {"results", "published"} and images == {name[:-4]: files[name] for name in pngs}
    assert tables["published"][0] == ["method", "backbone", "series", "dataset", "shots", "published", "source"]
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
