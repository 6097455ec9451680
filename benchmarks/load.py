"""Load: Gradio and Streamlit clients training and comparing at once, then each run re-run alone.

Starts the Gradio demo (`python -m toast_core.frontends.gradio_app`) and the Streamlit app (`streamlit run
app.py`) as real server processes on loopback ports, each with its own run registry. Then, at the
same time:
- N Gradio clients (gradio_client, one thread each) each submit a small tuning run through the demo's
  `/tune` endpoint (its RunManager) with its own method, task and seed, and keep requesting `/compare`
  while it trains, then one comparison with their new module;
- N Streamlit sessions (Chromium tabs through Playwright) each fill the Tuning Lab's form with their
  own seed, submit, then keep asking the Explorer for comparisons on changing scenes.
When every run has ended, each run's recorded config is trained again ALONE (a fresh RunManager with
the thread count its server used) and compared with what the loaded server produced: same final
metrics and the same module tensors. A run is ok when it finished done with its client's own
settings and matches its alone re-run; it crossed over when its record holds another client's
settings, or its module matches another run's alone re-run instead of its own.

    python benchmarks/load.py                  # embedded backbone, 4 + 4 clients, 6-step runs
    python benchmarks/load.py --backbone fixture --clients 2    # quick harness check

Last line: RESULT clients=… runs_ok=… runs_total=… crossed=… p95_compare_s=… (p95 over every
comparison request of both front ends while runs trained; per front end on the line before).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.app_latency import BUSY_JS, CHROMIUM, CHROMIUM_ARGS, LabServer, png_bytes  # noqa: E402
from benchmarks.servers import GradioServer  # noqa: E402

GRADIO_PLANS = (("linear", "stars"), ("lora", "glyphs"), ("linear", "glyphs"), ("lora", "stars"))
TOL = 1e-6  # max |difference| allowed between a loaded run and its alone re-run (metrics and tensors)


@dataclass
class Client:
    """One client's plan and what it saw."""

    front: str  # "gradio" | "streamlit"
    index: int
    method: str
    task: str
    seed: int
    run_id: str | None = None
    error: str | None = None
    compare_s: list[float] = field(default_factory=list)
    compare_errors: list[str] = field(default_factory=list)  # comparisons that did not answer
    label_seen: str | None = None  # the module label the client's own comparison showed


def _run_ended(runs_dir: Path, run_id: str | None) -> bool:
    from toast_core.runs import RunError
    from toast_core.runs.registry import read_run

    if run_id is None:
        return False
    try:
        return read_run(runs_dir / run_id).state not in ("queued", "running")
    except RunError:
        return False


# --- Gradio clients -------------------------------------------------------------------------------
def gradio_client_job(c: Client, url: str, image: Path, args: argparse.Namespace, runs_dir: Path) -> None:
    """Submit /tune, compare until the run has ended, then compare with the new module."""
    from gradio_client import Client as GClient
    from gradio_client import handle_file

    try:
        client = GClient(url, verbose=False)
        job = client.submit(c.method, c.task, args.steps, args.per_class, 1e-3, args.batch, c.seed, api_name="/tune")
        n = 0
        while not job.done() or n < args.min_compares:
            t0 = time.perf_counter()
            try:
                client.predict(handle_file(str(image)), ["base"], "cls", -1, "mean", None, None, None, None,
                               api_name="/compare")
                c.compare_s.append(time.perf_counter() - t0)
            except Exception as exc:  # counted: a comparison that did not answer under load
                c.compare_errors.append(f"{type(exc).__name__}: {exc}")
            n += 1
        message, _update = job.result(timeout=args.timeout)
        found = re.search(r"Run id `([^`]+)`", message)
        if not found:
            raise RuntimeError(f"tuning did not finish: {message}")
        c.run_id = found.group(1)
        _gallery, table, _fig, _note = client.predict(handle_file(str(image)), [c.run_id], "cls", -1, "mean",
                                                      None, None, None, None, api_name="/compare")
        c.label_seen = table["data"][0][0]
    except Exception as exc:  # reported per client; the benchmark counts it as a failed run
        c.error = f"{type(exc).__name__}: {exc}"


# --- Streamlit sessions ---------------------------------------------------------------------------
async def _settle(page, timeout_s: float, quiet_s: float = 0.5) -> None:
    end, calm = time.monotonic() + timeout_s, None
    while time.monotonic() < end:
        if await page.evaluate(BUSY_JS):
            calm = None
        elif calm is None:
            calm = time.monotonic()
        elif time.monotonic() - calm >= quiet_s:
            return
        await asyncio.sleep(0.1)


async def _fill(page, label: str, value: int, timeout_s: float) -> None:
    box = page.get_by_label(label, exact=True)
    await box.fill(str(value))
    await box.press("Enter")
    await _settle(page, timeout_s)


async def streamlit_session(c: Client, browser, url: str, args: argparse.Namespace, runs_dir: Path) -> None:
    """Submit a run in the Tuning Lab, then compare in the Explorer until it has ended."""
    try:
        page = await browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(args.timeout * 1000)
        await page.goto(f"{url}/tuning_lab")
        await page.get_by_role("button", name="Submit run").wait_for()
        for label, value in (("Steps", args.steps), ("Batch size", args.batch), ("Training images per class", args.per_class),
                             ("Validation images per class", args.val_per_class), ("Evaluate every (steps, 0 = end)", 0),
                             ("Attention snapshot every", 0), ("Seed", c.seed)):
            await _fill(page, label, value, args.timeout)
        await page.get_by_role("button", name="Submit run").click()
        note = page.get_by_text("Submitted run").first
        await note.wait_for()
        c.run_id = re.search(r"Submitted run\s+(\S+)", await note.inner_text()).group(1).strip("`.")
        await page.goto(f"{url}/explorer")
        await page.get_by_text(re.compile(r"Compared \d+ modules? on")).first.wait_for()
        n = 0
        while not _run_ended(runs_dir, c.run_id) or n < args.min_compares:
            n += 1
            index = 100 * c.index + n
            await _settle(page, args.timeout)
            t0 = time.perf_counter()
            box = page.get_by_label("Scene index", exact=True)
            await box.fill(str(index))
            await box.press("Enter")
            try:
                await page.get_by_text(re.compile(rf"Compared \d+ modules? on stars/test/{index} ")).first.wait_for()
                c.compare_s.append(time.perf_counter() - t0)
            except Exception as exc:  # counted: a comparison that did not answer under load
                c.compare_errors.append(f"{type(exc).__name__}: {exc}")
        await page.close()
    except Exception as exc:
        c.error = f"{type(exc).__name__}: {exc}"


async def load_phase(gradio: list[Client], lab: list[Client], g_url: str, s_url: str, image: Path,
                     args: argparse.Namespace, g_runs: Path, s_runs: Path) -> None:
    from playwright.async_api import async_playwright

    threads = [threading.Thread(target=gradio_client_job, args=(c, g_url, image, args, g_runs), daemon=True)
               for c in gradio]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        for t in threads:
            t.start()
        await asyncio.gather(*(streamlit_session(c, browser, s_url, args, s_runs) for c in lab))
        await browser.close()
    for t in threads:
        t.join(timeout=args.timeout)


# --- verification ---------------------------------------------------------------------------------
def _tensors(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "module.safetensors"))


def _difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return float("inf")
    return max((float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a if a[k].size), default=0.0)


def _metrics_difference(a: dict, b: dict) -> float:
    keys = [k for k, v in a.items() if isinstance(v, int | float)]
    if sorted(keys) != sorted(k for k, v in b.items() if isinstance(v, int | float)):
        return float("inf")
    return max((abs(float(a[k]) - float(b[k])) for k in keys), default=0.0)


def rerun_alone(backbone, runs_dir: Path, run_id: str, threads: int | None, scratch: Path):
    """The run's recorded config trained again, alone, in a fresh registry; returns (status, folder)."""
    from toast_core.runs import RunConfig, RunManager
    from toast_core.runs.registry import read_run

    config = RunConfig.from_dict(read_run(runs_dir / run_id).config)
    root = scratch / f"alone-{run_id}"
    with RunManager(root, backbone, cpu_workers=1, gpu_workers_per_device=0, cpu_threads=threads) as manager:
        alone_id = manager.submit(config)
        status = manager.wait(alone_id, timeout=3600)
    return status, root / alone_id


def verify(clients: list[Client], backbone, registries: dict[str, tuple[Path, int | None]], scratch: Path) -> dict:
    """Per client: done with its own settings, same numbers as alone; crossings; the per-run table."""
    from toast_core.runs.registry import read_run

    alone: dict[int, tuple] = {}
    for i, c in enumerate(clients):
        runs_dir, threads = registries[c.front]
        if c.run_id and (runs_dir / c.run_id / "module.safetensors").is_file():
            status, folder = rerun_alone(backbone, runs_dir, c.run_id, threads, scratch)
            alone[i] = (status, _tensors(folder))
    ok, crossed, rows = 0, 0, []
    for i, c in enumerate(clients):
        runs_dir, _ = registries[c.front]
        row = {"client": f"{c.front}-{c.index}", "plan": f"{c.method}/{c.task}/seed {c.seed}", "run": c.run_id,
               "state": None, "metrics_diff": None, "tensor_diff": None, "error": c.error}
        if c.run_id is None or i not in alone:
            rows.append(row)
            continue
        rec = read_run(runs_dir / c.run_id)
        row["state"] = rec.state
        own = (rec.config.get("method"), rec.config.get("task"), rec.config.get("seed")) == (c.method, c.task, c.seed)
        mine = _tensors(runs_dir / c.run_id)
        row["metrics_diff"] = _metrics_difference(rec.final, alone[i][0].final)
        row["tensor_diff"] = _difference(mine, alone[i][1])
        closer_to_other = any(_difference(mine, alone[j][1]) <= TOL for j in alone if j != i)
        label_ok = c.label_seen is None or c.label_seen.startswith(f"{c.method} on {c.task}")
        if not own or closer_to_other or not label_ok:
            crossed += 1
        if rec.state == "done" and own and row["metrics_diff"] <= TOL and row["tensor_diff"] <= TOL:
            ok += 1
        rows.append(row)
    return {"ok": ok, "crossed": crossed, "rows": rows}


def _p95(values: list[float]) -> float:
    return float(np.percentile(values, 95)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="embedded", help="embedded (default) or fixture (random weights)")
    parser.add_argument("--clients", type=int, default=4, help="clients per front end (Gradio and Streamlit each)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--val-per-class", type=int, default=1)
    parser.add_argument("--min-compares", type=int, default=3, help="comparisons each client makes at least")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    if not CHROMIUM.is_file():
        sys.exit("No /usr/bin/chromium: install Debian's chromium (apt-get install -y chromium).")
    from toast_core.frontends.cli import backbone_from_spec

    gradio = [Client("gradio", i, *GRADIO_PLANS[i % len(GRADIO_PLANS)], seed=1 + i) for i in range(args.clients)]
    lab = [Client("streamlit", i, "lora", "stars", seed=11 + i) for i in range(args.clients)]
    with tempfile.TemporaryDirectory(prefix="lab-load-") as tmp:
        tmp_path = Path(tmp)
        image = tmp_path / "probe.png"
        image.write_bytes(png_bytes(5, size=128))
        g_runs, s_runs = tmp_path / "gradio_runs", tmp_path / "lab_runs"
        t0 = time.perf_counter()
        with GradioServer(g_runs, args.backbone, tmp_path / "gradio.log") as g, \
                LabServer(s_runs, args.backbone, tmp_path / "streamlit.log") as s:
            g.wait_ready(args.timeout)
            s.wait_ready(args.timeout)
            ready_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            asyncio.run(load_phase(gradio, lab, g.url, s.url, image, args, g_runs, s_runs))
            load_s = time.perf_counter() - t1
            logs = {"gradio": g.log(), "streamlit": s.log()}
        lab_threads = None  # the app's RunManager: one CPU worker, cores // 1 threads (as below)
        result = verify(gradio + lab, backbone_from_spec(args.backbone),
                        {"gradio": (g_runs, 1), "streamlit": (s_runs, lab_threads)}, tmp_path)
    tracebacks = {k: v.count("Traceback") for k, v in logs.items()}
    for name, text in logs.items():
        for chunk in text.split("Traceback")[1:3]:
            print(f"--- {name} server log: Traceback ...{chunk[-2500:]}", file=sys.stderr)
    failed = [e for c in gradio + lab for e in c.compare_errors]
    for e in failed[:5]:
        print(f"comparison failed: {e[:300]}", file=sys.stderr)
    print(f"backbone {args.backbone}; {args.clients} Gradio clients + {args.clients} Streamlit sessions; "
          f"runs of {args.steps} steps (batch {args.batch}, {args.per_class}/class); servers up in {ready_s:.1f} s, "
          f"load phase {load_s:.1f} s")
    print(f"{'client':<13}{'plan':<24}{'run':<34}{'state':<8}{'metrics Δ':>11}{'tensor Δ':>11}  error")
    for r in result["rows"]:
        md = "" if r["metrics_diff"] is None else f"{r['metrics_diff']:.1e}"
        td = "" if r["tensor_diff"] is None else f"{r['tensor_diff']:.1e}"
        print(f"{r['client']:<13}{r['plan']:<24}{str(r['run']):<34}{str(r['state']):<8}{md:>11}{td:>11}  {r['error'] or ''}")
    g_times = [t for c in gradio for t in c.compare_s]
    s_times = [t for c in lab for t in c.compare_s]
    print(f"comparisons: gradio n={len(g_times)} median {np.median(g_times):.2f} s p95 {_p95(g_times):.2f} s; "
          f"streamlit n={len(s_times)} median {np.median(s_times):.2f} s p95 {_p95(s_times):.2f} s; "
          f"failed {len(failed)}; tracebacks in server logs: {tracebacks}")
    print(f"RESULT clients={len(gradio) + len(lab)} runs_ok={result['ok']} runs_total={len(gradio) + len(lab)} "
          f"crossed={result['crossed']} p95_compare_s={_p95(g_times + s_times):.2f} compare_failed={len(failed)}")


if __name__ == "__main__":
    main()
