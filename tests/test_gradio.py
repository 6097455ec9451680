"""The Gradio demo served for real: launched in a thread on a free port, called over HTTP with
gradio_client — the named comparison endpoint returns one PNG per module, the tuning endpoint trains
a run that the comparison can use next, and user mistakes come back as readable errors."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from toast_core.frontends.cli import backbone_from_spec
from toast_core.frontends.gradio_app import DemoContext, build_demo, launch, run_comparison, write_examples
from toast_core.runs import RunConfig, RunManager

gradio = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

pytestmark = [  # Gradio's own queue code trips pandas 3 deprecations; not ours to fix
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]
STARTUP_S = 300  # generous: the shared CI machine can be far slower than Gradio's own 3-5 s limits


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _patient_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradio gives its server thread 5 s to start and localhost 3 s to answer; on a machine shared
    with a training job that fails spuriously, so the test waits up to STARTUP_S instead."""
    import httpx
    from gradio import http_server, networking

    def url_ok(url: str) -> bool:
        end = time.monotonic() + STARTUP_S
        while time.monotonic() < end:
            try:
                if httpx.head(url, timeout=30, verify=False).status_code in (200, 401, 301, 302, 303, 307, 308):
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return False

    def run_in_thread(self) -> None:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + STARTUP_S
        while not self.started:
            if time.monotonic() > end:
                raise http_server.ServerFailedToStartError("The server did not start.")
            time.sleep(0.01)

    monkeypatch.setattr(networking, "url_ok", url_ok, raising=False)
    monkeypatch.setattr(http_server.Server, "run_in_thread", run_in_thread, raising=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A registry with one real 2-step LoRA run, and the demo serving it on a free port."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio_tmp")))
    _patient_startup(mp)
    root = tmp_path_factory.mktemp("runs")
    backbone = backbone_from_spec("fixture")
    config = RunConfig(method="lora", task="stars", per_class=1, val_per_class=1, device="cpu",
                       train={"steps": 2, "batch_size": 4}, snapshot_every=0, checkpoint_every=0)
    with RunManager(root, backbone, cpu_workers=1, gpu_workers_per_device=0, cpu_threads=1) as manager:
        run_id = manager.submit(config)
        assert manager.wait(run_id, timeout=600).state == "done"
    examples = write_examples(tmp_path_factory.mktemp("examples"), size=64)
    ctx = DemoContext(backbone, root, cpu_threads=1)
    demo = build_demo(ctx, examples=[str(p) for p in examples])
    port = _free_port()
    launch(demo, port=port, block=False, quiet=True)
    client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    yield {"client": client, "ctx": ctx, "run_id": run_id, "examples": examples}
    demo.close()
    ctx.close()
    mp.undo()


def _is_png(path: str) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG"


def test_compare_endpoint_returns_one_png_per_module(served):
    client, run_id = served["client"], served["run_id"]
    assert "/compare" in client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    image = gradio_client.handle_file(str(served["examples"][0]))
    gallery, table, figure, note = client.predict(
        image, ["base", run_id], "cls", -1, "mean", 0, 0, 32, 32, api_name="/compare"
    )
    assert len(gallery) == 2
    for item in gallery:
        assert Path(item["image"]).is_file() and _is_png(item["image"])
    with Image.open(gallery[0]["image"]) as im:
        assert im.size == (64, 64)  # overlays at the original image size
    assert gallery[1]["caption"].startswith("lora on stars: star")
    rows = table["data"]
    assert [r[0] for r in rows] == ["base backbone (no head)", "lora on stars"]
    assert all(r[4] == pytest.approx(0.25) for r in rows)  # area share of a quarter-image box
    assert Path(figure).is_file() and _is_png(figure)
    assert "64×64" in note


def test_compare_endpoint_reports_user_errors(served):
    client = served["client"]
    image = gradio_client.handle_file(str(served["examples"][1]))
    with pytest.raises(Exception, match="No run or module 'no_such_run'"):
        client.predict(image, ["no_such_run"], "cls", -1, "mean", None, None, None, None, api_name="/compare")
    with pytest.raises(Exception, match="all four box numbers"):
        client.predict(image, ["base"], "cls", -1, "mean", 1, 2, None, None, api_name="/compare")


def test_tuning_endpoint_trains_a_run_the_explorer_can_use(served):
    client = served["client"]
    message, update = client.predict("linear", "glyphs", 2, 1, 1e-3, 4, api_name="/tune")
    assert "done in 2 steps" in message
    new_id = next(v for v in update["value"] if v != "base")
    assert new_id in [c[1] for c in update["choices"]] and new_id != served["run_id"]
    gallery, *_ = client.predict(gradio_client.handle_file(str(served["examples"][2])), [new_id, "base"],
                                 "rollout", -1, "mean", None, None, None, None, api_name="/compare")
    assert len(gallery) == 2 and all(_is_png(g["image"]) for g in gallery)


def test_run_comparison_checks_inputs_before_work(served):
    ctx, example = served["ctx"], str(served["examples"][0])
    with pytest.raises(ValueError, match="Layer 7 does not exist"):
        run_comparison(ctx, example, ["base"], "cls", 7, "mean")
    with pytest.raises(ValueError, match="Head 5 does not exist"):
        run_comparison(ctx, example, ["base"], "cls", -1, "5")
    with pytest.raises(ValueError, match="Upload an image"):
        run_comparison(ctx, None, ["base"])
    with pytest.raises(ValueError, match="at least one module"):
        run_comparison(ctx, example, [])
