"""Bad input never crashes, hangs, leaks a secret or writes outside its root (embedded mode, real CLI).

One folder holds a symlink loop, a dangling link, a FIFO, a folder link to itself, a file name that is not
UTF-8, names with rich markup and terminal escapes, a broken image, and good images; the output root lies
inside it. A manifest names a FIFO, a device, a folder and signed http URLs served by a local server.
The distributed mode runs the same sources and ``process_chunk``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sam3_batch.contracts.schemas import ImageMetadata, JobReport
from tests.fixtures.images import image_bytes
from tests.fixtures.workers import REPO_ROOT

TRACEBACK = "Traceback (most recent call last)"
SIGNATURE, TOKEN = "SENTINELsig0123456789", "SENTINELtoken9876543210"


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "sam3_batch", "run", *args, "--model", "tiny-random",
                           "--device", "cpu", "--threshold", "0"], capture_output=True, text=True, timeout=300,
                          env={**base, **env}, cwd=cwd)


def _reports(out: Path) -> list[JobReport]:
    found = [JobReport.model_validate_json(p.read_text()) for p in (out / "_jobs").glob("*/report.json")]
    return sorted(found, key=lambda r: r.started_at)


def _hostile_folder(root: Path) -> Path:
    folder = root / "in"
    (folder / "deep").mkdir(parents=True)
    (folder / "a.png").write_bytes(image_bytes("png"))
    (folder / "deep" / "b.jpg").write_bytes(image_bytes("jpeg"))
    os.symlink("loop.jpg", folder / "loop.jpg")  # ELOOP when followed
    os.symlink("nowhere.jpg", folder / "gone.jpg")
    os.mkfifo(folder / "pipe.jpg")  # reading it would block forever
    os.symlink(".", folder / "again")  # a folder loop: never followed
    os.mkfifo(folder / "deep" / "pipe.png")
    (folder / "[red]bad[bold].jpg").write_text("not an image")
    (folder / "esc\x1b[31mred\x1b]0;title\x07.jpg").write_text("not an image either")
    with open(os.fsencode(folder) + b"/caf\xe9-latin1.png", "wb") as latin1:  # not valid UTF-8
        latin1.write(image_bytes("png"))
    return folder


@pytest.mark.timeout(900)
def test_a_hostile_folder_fails_item_by_item_and_outputs_inside_it_are_never_relisted(tmp_path: Path) -> None:
    folder = _hostile_folder(tmp_path)
    masks = folder / "masks"
    args = [str(folder), "-p", "thing", "--masked", "--png-masks"]

    beside = _run([*args, "--out", str(folder)], tmp_path)  # outputs next to the inputs
    first = _run([*args, "--out", str(masks)], tmp_path)  # ... then in a folder inside the inputs

    for result in (beside, first):
        assert result.returncode == 2, result.stderr  # some images failed; the job itself ran to its end
        assert TRACEBACK not in result.stderr and "\x1b" not in result.stderr and "\x07" not in result.stderr
    [report] = _reports(masks)
    c = report.counters
    assert (c.total, c.done, c.failed) == (7, 2, 5)  # FIFOs and the folder loop are not images to list
    reasons = {f.uri.rsplit("/", 1)[-1]: f.reason for f in report.failures}
    assert "Too many levels of symbolic links" in reasons["loop.jpg"]
    assert "no such file" in reasons["gone.jpg"]
    assert sorted(reasons)[:4] == ["[red]bad[bold].jpg", "caf\\xe9-latin1.png", "esc\x1b[31mred\x1b]0;title\x07.jpg",
                                   "gone.jpg"]
    assert "[red]bad[bold].jpg: " in first.stderr  # markup printed as text
    assert "not valid UTF-8" in reasons["caf\\xe9-latin1.png"]
    assert "caf\\xe9-latin1.png: " in first.stderr
    [earlier] = _reports(folder)
    assert (earlier.counters.total, earlier.counters.done) == (7, 2)  # ... so no mask or masked image came back in
    assert list(folder.glob("*.masked.png")) and list(masks.glob("*.masked.png"))
    assert not list(tmp_path.glob("_jobs")) and not Path("/_jobs").exists()


@pytest.fixture
def signed_server() -> Iterator[str]:
    png = image_bytes("png")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            found = self.path.startswith("/img.png?")
            body = png if found else b"no"
            self.send_response(200 if found else 403)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(600)
def test_non_regular_files_fail_at_once_and_signed_urls_never_reach_outputs_reports_or_the_terminal(
    tmp_path: Path, signed_server: str,
) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    os.symlink("self.png", tmp_path / "self.png")
    (tmp_path / "dir.png").mkdir()
    query = f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA{TOKEN}&X-Amz-Signature={SIGNATURE}&w=1"
    entries = [str(tmp_path / "pipe.png"), "/dev/zero", str(tmp_path / "dir.png"), str(tmp_path / "self.png"),
               f"{signed_server}/img.png?{query}", f"{signed_server}/denied.png?token={TOKEN}&sig={SIGNATURE}"]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"uri": e}) for e in entries))
    out = tmp_path / "out"

    result = _run(["--manifest", str(manifest), "-p", "thing", "--out", str(out)], tmp_path,
                  SAM3_BATCH_HTTP_ALLOW_PRIVATE="true")

    assert result.returncode == 2 and TRACEBACK not in result.stderr, result.stderr
    [report] = _reports(out)
    assert (report.counters.done, report.counters.failed) == (1, 5)
    reasons = {f.uri: f.reason for f in report.failures}
    assert "only regular files are read" in reasons[str(tmp_path / "pipe.png")]
    assert "only regular files are read" in reasons["/dev/zero"]
    assert "a folder" in reasons[str(tmp_path / "dir.png")]
    assert "Too many levels of symbolic links" in reasons[str(tmp_path / "self.png")]
    assert f"{signed_server}/denied.png?token=***&sig=***" in reasons
    [metadata_path] = [p for p in out.rglob("*.json") if "_jobs" not in p.parts]
    metadata = ImageMetadata.model_validate_json(metadata_path.read_text())
    assert metadata.image.uri == f"{signed_server}/img.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***" \
        "&X-Amz-Signature=***&w=1"
    assert metadata.image.file_name == "img.png"
    [part] = list(out.glob("_jobs/*/parts/*.parquet"))
    rows = pq.read_table(part).to_pylist()
    assert [r["uri"] for r in rows if r["status"] == "done"] == [metadata.image.uri]
    assert f"{signed_server}/denied.png?token=***&sig=***" in [r["uri"] for r in rows if r["status"] == "failed"]
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SIGNATURE.encode() not in data and TOKEN.encode() not in data, path
    assert SIGNATURE not in result.stderr + result.stdout and TOKEN not in result.stderr + result.stdout


@pytest.mark.timeout(600)
def test_a_single_image_file_is_a_source_of_one_and_an_empty_folder_says_so(tmp_path: Path) -> None:
    image = tmp_path / "one.png"
    image.write_bytes(image_bytes("png"))
    (tmp_path / "empty").mkdir()

    single = _run([str(image), "-p", "thing", "--out", str(tmp_path / "o1")], tmp_path)
    empty = _run([str(tmp_path / "empty"), "-p", "thing", "--out", str(tmp_path / "o2")], tmp_path)

    assert single.returncode == 0, single.stderr
    assert (tmp_path / "o1" / "one.png.json").is_file()
    assert empty.returncode == 1 and "no images found in" in empty.stderr and TRACEBACK not in empty.stderr
