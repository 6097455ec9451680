"""The Streamlit Explorer and Tuning Lab over the hostile set, through AppTest (the page scripts as
Streamlit runs them): every refusal is one error naming the cause and the file, the odd pictures are
compared at their decoded size, hostile zips are refused with the importer's reason, and a zip
holding hostile images imports with those images listed as skipped. The same set in a real browser
is `tests/test_browser_hostile.py`."""

from __future__ import annotations

import io
import zipfile

from hostile_inputs import decodable_images, good_dataset_members, hostile_zips, refused_images
from test_app_pages import lab_env, page, texts  # noqa: F401 - lab_env: fixture backbone, temp registry


def test_explorer_refuses_each_hostile_image_with_its_cause() -> None:
    at = page("pages/explorer.py").run()
    at.radio(key="ex_source").set_value("Upload an image").run()
    for upload in refused_images():
        at.session_state["explorer_rendered"] = 0
        at.file_uploader(key="ex_upload").clear()
        at.file_uploader(key="ex_upload").upload(upload.name, upload.data, "image/png").run()
        assert not at.exception, (upload.key, at.exception)
        errors = texts(at.error)
        assert len(errors) == 1, (upload.key, errors)
        assert upload.refusal in errors[0] and f"'{upload.name}'" in errors[0], (upload.key, errors)
        assert at.session_state["explorer_rendered"] == 0


def test_explorer_compares_each_odd_picture_at_its_decoded_size() -> None:
    at = page("pages/explorer.py").run()
    at.radio(key="ex_source").set_value("Upload an image").run()
    for upload in decodable_images():
        at.file_uploader(key="ex_upload").clear()
        at.file_uploader(key="ex_upload").upload(upload.name, upload.data, "image/png").run()
        assert not at.exception, (upload.key, at.exception)
        assert not at.error, (upload.key, texts(at.error))
        assert at.session_state["explorer_rendered"] == 1, upload.key
        w, h = upload.size
        assert any(f"the image is {w} × {h}" in c for c in texts(at.caption)), (upload.key, texts(at.caption))


def _zip(members) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def test_tuning_lab_refuses_hostile_zips_and_skips_hostile_images_inside_a_good_one() -> None:
    at = page("pages/tuning_lab.py").run()
    at.radio(key="tl_source").set_value("Uploaded zip of class folders").run()
    for z in hostile_zips():
        at.file_uploader(key="tl_zip").clear()
        at.file_uploader(key="tl_zip").upload(z.name, z.data, "application/zip").run()
        assert not at.exception, (z.key, at.exception)
        errors = texts(at.error)
        assert len(errors) == 1 and z.dataset_refusal in errors[0], (z.key, errors)
        assert at.button(key="tl_submit").disabled, z.key
    # images that are not images, inside class folders of an otherwise fine zip: skipped, with reasons
    inside = [u for u in refused_images() if u.name.endswith((".png", ".jpg"))]
    members = good_dataset_members() + [(f"cat/{u.name}", u.data) for u in inside]
    at.file_uploader(key="tl_zip").clear()
    at.file_uploader(key="tl_zip").upload("mixed_images.zip", _zip(members), "application/zip").run()
    assert not at.exception and not at.error, texts(at.error)
    assert any("2 classes, 6 images" in s for s in texts(at.success)), texts(at.success)
    assert any(f"{len(inside)} files skipped" in e.label for e in at.expander)
    assert not at.button(key="tl_submit").disabled
