"""Every expected error reaches the user as one readable line and a non-zero exit, never a traceback.

The entry point (``sam3_batch.cli.main``) is called in this process with real arguments, real files and
real Redis servers (one alive, one dead port); a few cases go through ``python -m sam3_batch`` as well.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sam3_batch import cli
from tests.fixtures.images import image_bytes
from tests.fixtures.workers import REPO_ROOT

TRACEBACK = "Traceback (most recent call last)"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    for name in list(os.environ):
        if name.startswith("SAM3_BATCH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SAM3_BATCH_BROKER_URL", f"redis://127.0.0.1:{_dead_port()}/0")
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def _dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    sys.argv = ["sam3-batch", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line(code: int, err: str, expected_code: int, *fragments: str) -> None:
    assert code == expected_code, err
    assert TRACEBACK not in err
    lines = [line for line in err.splitlines() if line.strip() and "masks are meaningless" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.png").write_bytes(image_bytes("png"))
    return folder


RUN = ["run", "--model", "tiny-random", "--device", "cpu"]


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--out", "", "-p", "x"], "--out must name an output root"),
    (["--out", "   ", "-p", "x"], "--out must name an output root"),
    (["--out", "https://example.com/out/", "-p", "x"], "http(s) is read-only"),
    (["--out", "gs://bucket/out", "-p", "x"], "unsupported URI scheme"),
    (["--out", "o"], "give at least one --prompt"),
    (["--out", "o", "-p", "  "], "prompts must not be empty or whitespace only"),
    (["--out", "o", "-p", "x" * 300], "at most 256 characters"),
    (["--out", "o", *[a for i in range(65) for a in ("-p", f"p{i}")]], "at most 64 items"),
    (["--out", "o", "-p", "x", "--chunk-size", "1001"], "chunk_size: Input should be less than or equal to 1000"),
    (["--out", "o", "-p", "x", "--dtype", "float64"], "dtype"),
    (["--out", "o", "-p", "x", "--device", "tpu"], "device"),
    (["--out", "o", "-p", "x", "--model", "./no/such/model"], "model path ./no/such/model does not exist"),
])
def test_a_bad_run_request_fails_before_anything_loads_with_one_line(
    clean_env: Path, capsys: pytest.CaptureFixture[str], extra: list[str], fragment: str,
) -> None:
    started = time.monotonic()
    code, _out, err = _main([*RUN, str(_images(clean_env / "in")), *extra], capsys)

    _assert_one_line(code, err, 2, fragment)
    assert time.monotonic() - started < 30  # no model was loaded and nothing was listed
    assert not (clean_env / "o").exists() or not any((clean_env / "o").iterdir())


def test_an_output_root_that_is_a_file_or_unwritable_is_refused_before_the_model_loads(
    clean_env: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    images = _images(clean_env / "in")
    a_file = clean_env / "file.txt"
    a_file.write_text("not a folder")

    code, _, err = _main([*RUN, str(images), "-p", "x", "--out", str(a_file)], capsys)
    _assert_one_line(code, err, 2, "is a file, not a folder")
    code, _, err = _main([*RUN, str(images), "-p", "x", "--out", "/sys/sam3-batch-out"], capsys)
    _assert_one_line(code, err, 2, "cannot write to the output root /sys/sam3-batch-out")
    code, _, err = _main([*RUN, str(images), "-p", "x", "--out", f"{a_file}/below"], capsys)
    _assert_one_line(code, err, 2, "cannot write to the output root")


@pytest.mark.parametrize(("inputs", "code", "fragment"), [
    (["missing-folder"], 1, "input missing-folder does not exist"),
    (["notes.txt"], 1, "is a file without an image extension"),
    (["http://[::1/x.jpg"], 1, "malformed URI"),
    (["ftp://host/x.jpg"], 1, "unsupported input scheme 'ftp'"),
    (["in", "in2"], 1, "give one S3 prefix or folder"),
])
def test_a_bad_input_fails_with_one_line(
    clean_env: Path, capsys: pytest.CaptureFixture[str], inputs: list[str], code: int, fragment: str,
) -> None:
    _images(clean_env / "in")
    _images(clean_env / "in2")
    (clean_env / "notes.txt").write_text("text")

    found, _, err = _main([*RUN, *inputs, "-p", "x", "--out", "o"], capsys)
    _assert_one_line(found, err, code, fragment)


@pytest.mark.parametrize("command", [["status", "job1"], ["jobs"], ["failures", "job1"], ["cancel", "job1"],
                                     ["retry-failed", "job1"], ["submit", "in", "-p", "x", "--out", "o"]])
def test_interactive_commands_against_a_dead_redis_fail_within_seconds(
    clean_env: Path, capsys: pytest.CaptureFixture[str], command: list[str],
) -> None:
    _images(clean_env / "in")
    started = time.monotonic()
    code, _, err = _main(command, capsys)

    _assert_one_line(code, err, 1, "cannot reach Redis")
    assert time.monotonic() - started < 10


def test_wrong_password_and_malformed_broker_url_are_one_line(
    clean_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, redis_url: str,
) -> None:
    monkeypatch.setenv("SAM3_BATCH_BROKER_URL", redis_url.replace("redis://", "redis://nobody:s3cret-pw@"))
    code, _, err = _main(["jobs"], capsys)
    _assert_one_line(code, err, 1, "Redis")
    assert "s3cret-pw" not in err

    monkeypatch.setenv("SAM3_BATCH_BROKER_URL", "localhost:6379")
    code, _, err = _main(["status", "job1"], capsys)
    _assert_one_line(code, err, 2, "malformed Redis URL")


def test_unknown_jobs_and_markup_in_user_data_are_printed_as_text(
    clean_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, flush_redis: str,
) -> None:
    monkeypatch.setenv("SAM3_BATCH_BROKER_URL", flush_redis)
    for command in (["status"], ["failures"], ["cancel"], ["retry-failed"]):
        code, _, err = _main([*command, "[bold]x[/bold]\x1b[31m"], capsys)
        _assert_one_line(code, err, 1, "unknown job [bold]x[/bold]")
        assert "\x1b" not in err


def test_a_corrupt_checkpoint_fails_with_one_line(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = clean_env / "model"
    model.mkdir()
    (model / "config.json").write_text("{ not json")
    code, _, err = _main([*RUN, str(_images(clean_env / "in")), "-p", "x", "--out", "o", "--model", str(model)],
                         capsys)
    _assert_one_line(code, err, 1, f"cannot load model {model}")


def test_the_real_entry_point_prints_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    import subprocess

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO_ROOT),
           "SAM3_BATCH_BROKER_URL": f"redis://127.0.0.1:{_dead_port()}/0"}
    plain = subprocess.run([sys.executable, "-m", "sam3_batch", "status", "job1"], capture_output=True,
                           text=True, env=env, timeout=120)
    debug = subprocess.run([sys.executable, "-m", "sam3_batch", "--debug", "status", "job1"],
                           capture_output=True, text=True, env=env, timeout=120)

    _assert_one_line(plain.returncode, plain.stderr, 1, "cannot reach Redis")
    assert debug.returncode != 0 and TRACEBACK in debug.stderr
