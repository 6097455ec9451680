"""The Gradio demo over the hostile set, as a user's browser reaches it: a real server process
(`python -m toast_core.gradio_app`), called with gradio_client. Every refusal is the library's message
naming the cause, the odd pictures are compared at their decoded size, and the server log has one
line per refusal and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.servers import GradioServer
from hostile_inputs import decodable_images, refused_images, write_images

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
