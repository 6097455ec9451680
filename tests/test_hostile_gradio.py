"""The Gradio demo over the hostile set, as a user's browser reaches it: a real server process
(`python -m toast_core.frontends.gradio_app`), called with gradio_client. Every refusal is the library's message
naming the cause, the odd pictures are compared at their decoded size, and the server log has one
line per refusal and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile_inputs import decodable_images, refused_images, write_images

from benchmarks.servers import GradioServer

gradio_client = pytest.importorskip("gradio_client")

STARTUP_S = 300  # the test machine is shared with training jobs


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("hostile_gradio")
    with GradioServer(tmp / "runs", "fixture", tmp / "server.log") as srv:
        srv.wait_ready(STARTUP_S)
        client = gradio_client.Client(srv.url, verbose=False)
        yield srv, client, write_images(tmp / "uploads")


def _compare(client, path: Path):
    return client.predict(gradio_client.handle_file(str(path)), ["base"], "cls", -1, "mean",
                          None, None, None, None, api_name="/compare")


def test_every_refusal_is_the_librarys_message_and_one_log_line(server) -> None:
    srv, client, paths = server
    for upload in refused_images():
        with pytest.raises(Exception) as info:
            _compare(client, paths[upload.key])
        message = str(info.value)
        assert upload.refusal in message and f"'{upload.name}'" in message, (upload.key, message)
        assert "Could not preprocess" not in message
    log = srv.log()
    assert "Traceback" not in log, log[-3000:]
    refusals = [line for line in log.splitlines() if "compare refused (ImageInputError)" in line]
    for upload in refused_images():
        assert sum(f"'{upload.name}'" in line and upload.refusal in line for line in refusals) == 1, (upload.key, refusals)


def test_odd_pictures_are_compared_at_their_decoded_size(server) -> None:
    srv, client, paths = server
    for upload in decodable_images():
        gallery, _table, figure, note = _compare(client, paths[upload.key])
        w, h = upload.size
        assert f"Image {w}×{h} px" in note, (upload.key, note)
        assert len(gallery) == 1 and Path(figure).is_file()
    assert "Traceback" not in srv.log()


def test_an_upload_over_the_size_limit_never_reaches_the_server(server, tmp_path: Path) -> None:
    srv, client, _ = server
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * (21 * 1024 * 1024))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        _compare(client, big)
    assert "Traceback" not in srv.log()


@pytest.mark.browser
def test_a_refusal_is_shown_in_the_page(server) -> None:
    """In Chromium: the refused upload's message appears in the page (Gradio's error toast carries
    the library's text, not Gradio's generic preprocessing error)."""
    import re

    from benchmarks.app_latency import CHROMIUM, launch_chromium

    if not CHROMIUM.is_file():
        pytest.skip("No /usr/bin/chromium (install Debian's chromium: apt-get install -y chromium).")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    srv, _client, _paths = server
    upload = next(u for u in refused_images() if u.key == "text_png")
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(STARTUP_S * 1000)
            page.goto(srv.url)
            page.locator("input[type=file]").first.set_input_files(
                files=[{"name": upload.name, "mimeType": "image/png", "buffer": upload.data}])
            page.get_by_text(Path(upload.name).stem, exact=True).first.wait_for()  # the upload reached the server
            page.get_by_role("button", name="Compare", exact=True).click()
            page.get_by_text(re.compile(re.escape(f"'{upload.name}'") + ".*" + re.escape(upload.refusal))).first.wait_for()
            assert page.get_by_text("Could not preprocess").count() == 0
        finally:
            browser.close()
    assert "Traceback" not in srv.log()
