"""App latency in a real browser: cold start to the first Explorer comparison, and upload → comparison.

Starts `streamlit run app.py` as a subprocess, drives Debian's Chromium through Playwright (sync API,
never `playwright install`), and measures what a person waits for:
- cold_start_s: from launching the server to the Explorer's first rendered comparison (backbone load,
  module loads and every map included) on a fresh registry: the base backbone + the six lecture-zoo
  modules the first view compares (the fixture backbone of --smoke has no zoo: 5 seeded runs). The
  server starts loading torch, timm and the backbone when it starts (app.py's warm-up), so that
  load overlaps with the browser opening the page;
- compare6_s: from handing a new PNG to the uploader to the comparison of the same modules on it
  (median over a few different images, so no cache hit).
Targets on CPU: cold start <= 10 s, compare6 <= 2 s.

    python benchmarks/app_latency.py            # embedded backbone (checkpoints/embedded_vit.*)
    python benchmarks/app_latency.py --smoke    # fixture backbone, seconds, to check the harness
    python benchmarks/app_latency.py --screenshots assets/screenshots   # also shoot every page

The helpers (LabServer, launch_chromium, ...) are shared with tests/test_browser.py.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
#: page url paths (st.Page infers them from the file names in pages/)
PAGES = {"home": "", "explorer": "explorer", "tuning_lab": "tuning_lab", "fewshot": "fewshot",
         "benchmark": "benchmark", "backbones": "backbones"}
SEED_METHODS = ("linear", "bitfit", "lora", "vpt", "toast")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LabServer:
    """`streamlit run app.py` in its own process group, stopped (only that group) on exit."""

    def __init__(self, runs_dir: Path, backbone: str = "fixture", log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runs_dir, self.backbone = Path(runs_dir), backbone
        self.log_path = log or Path(tempfile.mkstemp(prefix="streamlit-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> LabServer:
        env = dict(os.environ, TOAST_LAB_BACKBONE=self.backbone, TOAST_LAB_RUNS_DIR=str(self.runs_dir),
                   PYTHONPATH=os.environ.get("TOAST_LAB_EXTRA_PYTHONPATH", "") + str(ROOT), STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
        cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
               "--server.port", str(self.port), "--server.address", "127.0.0.1",
               "--server.fileWatcherType", "none"]
        self._log = open(self.log_path, "wb")
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from start until the health endpoint answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.started_at
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"streamlit did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the group this server leads, nothing else
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        self._log.close()

    def __enter__(self) -> LabServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch_chromium(playwright):
    """Debian's Chromium, headless, no network side channels."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def png_bytes(seed: int, size: int = 160) -> bytes:
    """A colourful test picture (blobs on noise), different for every seed."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(4):
        cy, cx, r = rng.integers(20, size - 20, 2).tolist() + [int(rng.integers(10, 30))]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(80, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def seed_runs(runs_dir: Path, backbone: str, methods=SEED_METHODS, steps: int = 2, batch: int = 8,
              per_class: int = 2) -> list[str]:
    """Train tiny modules into the registry (in this process, before the server opens it)."""
    import torch

    from toast_core.frontends.app_state import load_spec, spec_from_env
    from toast_core.runs import RunConfig, RunManager

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with RunManager(runs_dir, load_spec(spec_from_env(backbone))) as manager:
        ids = [
            manager.submit(RunConfig(method=m, task="stars", per_class=per_class, val_per_class=max(1, per_class // 2),
                                     snapshot_every=0, checkpoint_every=0,
                                     train={"steps": steps, "batch_size": batch, "lr": 1e-3, "eval_every": 0}))
            for m in methods
        ]
        for run_id in ids:
            status = manager.wait(run_id, timeout=600)
            if status.state != "done":
                raise RuntimeError(f"seeding run {run_id} ended {status.state}: {status.error}")
    return ids


def compared(n: int, name: str | None = None) -> re.Pattern[str]:
    """The Explorer's status line once `n` maps are drawn (on `name`, if given)."""
    where = re.escape(name) if name else r"\S+"
    return re.compile(rf"Compared {n} modules? on {where}")


def wait_text(page, pattern: re.Pattern[str] | str, timeout_s: float) -> None:
    page.get_by_text(pattern).first.wait_for(state="visible", timeout=timeout_s * 1000)


def upload_on_explorer(page, name: str, data: bytes, timeout_s: float = 300.0) -> None:
    """Switch the Explorer to uploads (if needed) and hand the file to the uploader."""
    file_input = page.locator("input[type=file]")
    if file_input.count() == 0:
        page.get_by_text("Upload an image", exact=True).click()
        file_input.first.wait_for(state="attached", timeout=timeout_s * 1000)
    file_input.first.set_input_files(files=[{"name": name, "mimeType": "image/png", "buffer": data}])


BUSY_JS = """() => document.querySelector("[data-testid='stApp'][data-test-script-state='running']") !== null
  || document.querySelector("[data-testid='stStatusWidget'] [data-testid='stStatusWidgetRunningIcon']") !== null
  || document.querySelector("[data-testid='stSkeleton'], [data-testid='stSpinner']") !== null
  || [...document.images].some(img => !img.complete)"""


def settle(page, quiet_s: float = 0.6, timeout_s: float = 120.0) -> None:
    """Wait until no script runs, no element is a loading skeleton and every image has loaded."""
    deadline = time.monotonic() + timeout_s
    calm_since = None
    while time.monotonic() < deadline:
        if page.evaluate(BUSY_JS):
            calm_since = None
        elif calm_since is None:
            calm_since = time.monotonic()
        elif time.monotonic() - calm_since >= quiet_s:
            return
        time.sleep(0.1)


def full_screenshot(page, path: Path, max_height: int = 5000) -> Path:
    """A screenshot of the whole page: Streamlit scrolls inside its main container, not the body,
    so the viewport is stretched to the content's height first."""
    size = page.viewport_size or {"width": 1400, "height": 1000}
    height = page.evaluate(
        """() => Math.max(...[...document.querySelectorAll("[data-testid='stMain'], [data-testid='stAppViewContainer'], section.main")]
                 .map(e => e.scrollHeight), document.body.scrollHeight)"""
    )
    page.set_viewport_size({"width": size["width"], "height": int(min(max(height, size["height"]), max_height))})
    settle(page)
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(size)
    return path


#: what each page shows once its first run is complete
READY = {"home": "Lecture presets", "explorer": re.compile(r"Compared \d+ modules? on"), "tuning_lab": "Submit run",
         "fewshot": "Run both on this episode",
         # with the shipped zoo the Benchmark page opens on the zoo's table; without it, on the seeded runs'
         "benchmark": re.compile(r"The lecture zoo|Download CSV"), "backbones": "Switch"}


def screenshot_pages(page, base_url: str, out_dir: Path) -> list[Path]:
    """Full-page screenshots of every page (the Few-shot page after one FT vs FORT run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shots = []
    for name, path in PAGES.items():
        page.goto(f"{base_url}/{path}")
        page.locator("h1").first.wait_for(timeout=120_000)
        wait_text(page, READY[name], 300)
        if name == "fewshot":
            page.get_by_role("button", name="Run both on this episode").click()
            wait_text(page, "query accuracy", 300)
        settle(page)
        shots.append(full_screenshot(page, out_dir / f"{name}.png"))
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="fixture backbone (random weights): checks the harness")
    parser.add_argument("--repeats", type=int, default=3, help="uploads timed for compare6_s")
    parser.add_argument("--screenshots", type=Path, default=None, help="also save a screenshot of every page here")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="registry to use (kept); seeded only when it has no finished runs. Default: a temp dir")
    parser.add_argument("--seed-steps", type=int, default=2, help="training steps of each seeded module")
    parser.add_argument("--seed-batch", type=int, default=8)
    parser.add_argument("--seed-per-class", type=int, default=2, help="training images per class of each seeded run")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for each comparison (raise it on a loaded machine)")
    args = parser.parse_args()
    if not CHROMIUM.is_file():
        sys.exit("No /usr/bin/chromium: install Debian's chromium (apt-get install -y chromium).")
    from playwright.sync_api import sync_playwright

    backbone = "fixture" if args.smoke else "embedded"
    with tempfile.TemporaryDirectory(prefix="lab-latency-") as tmp:
        runs = args.runs_dir or Path(tmp) / "runs"
        t = time.perf_counter()
        done = list(runs.glob("*/module.json")) if runs.is_dir() else []
        # the embedded backbone ships the lecture zoo: a fresh registry already compares the base and
        # six zoo modules (nothing to seed); the fixture backbone has no zoo, so runs are seeded
        shown = 7 if not args.smoke else 6
        if args.smoke and len(done) < len(SEED_METHODS):
            seed_runs(runs, backbone, steps=args.seed_steps, batch=args.seed_batch, per_class=args.seed_per_class)
        seed_s = time.perf_counter() - t
        with sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(180_000)
            with LabServer(runs, backbone, Path(tmp) / "server.log") as server:
                health_s = server.wait_ready(max(120.0, args.timeout))
                page.goto(f"{server.url}/explorer")
                wait_text(page, compared(shown), args.timeout)
                cold = time.perf_counter() - server.started_at
                times = []
                for i in range(args.repeats):
                    name = f"bench-{i}.png"
                    data = png_bytes(100 + i)
                    settle(page)
                    t0 = time.perf_counter()
                    upload_on_explorer(page, name, data)
                    wait_text(page, compared(shown, name), args.timeout)
                    times.append(time.perf_counter() - t0)
                if args.screenshots:
                    screenshot_pages(page, server.url, args.screenshots)
            browser.close()
    compare = statistics.median(times)
    if args.smoke:
        print(f"backbone: fixture (random weights); 6 modules = base + {', '.join(SEED_METHODS)} (seeded in {seed_s:.1f} s)")
    else:
        print("backbone: embedded; a fresh registry: 7 maps = base + the six zoo modules of the Explorer's first view")
    print(f"{'measure':<34}{'seconds':>10}{'target':>10}")
    print(f"{'server health endpoint up':<34}{health_s:>10.2f}{'':>10}")
    print(f"{'cold start -> first comparison':<34}{cold:>10.2f}{'<= 10':>10}")
    print(f"{'upload -> comparison (median)':<34}{compare:>10.2f}{'<= 2':>10}")
    print(f"{'upload -> comparison (all)':<34}{', '.join(f'{x:.2f}' for x in times):>10}")
    print(f"RESULT cold_start_s={cold:.2f} compare6_s={compare:.2f}")


if __name__ == "__main__":
    main()
