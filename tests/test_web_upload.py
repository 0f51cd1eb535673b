"""A 200 MiB upload to a real `embargo web` process: the server's peak
memory grows by less than 64 MiB, and no byte of the document is left in
plaintext under the data dir or in any temporary folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from release import accounts
from release.keys import init_keys
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
SIZE = 200 * MIB
MARKER = b"EMBARGO-UPLOAD-MARKER-91c2"
PASSWORD = "correct horse battery"


def memory(pid: int, field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of a process, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) * 1024


def reset_peak(pid: int) -> None:
    """Make VmHWM start again from the present resident set (Linux clear_refs
    "5"), so the peak measured is the upload's, not the sign-in's argon2id."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def contains(path: Path, needle: bytes) -> bool:
    """``needle`` anywhere in the file, read 8 MiB at a time."""
    tail = b""
    try:
        with path.open("rb") as handle:
            while block := handle.read(8 * MIB):
                if needle in tail + block:
                    return True
                tail = block[-len(needle):]
    except OSError:  # gone meanwhile, or not ours to read
        return False
    return False


@pytest.fixture
def console(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path, Path]]:
    data = tmp_path / "var"
    private_tmp = tmp_path / "server-tmp"
    private_tmp.mkdir()
    port = free_port()
    base = f"http://localhost:{port}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EMBARGO_")},
           "EMBARGO_DATA_DIR": str(data), "EMBARGO_WEB_BIND": f"127.0.0.1:{port}",
           "EMBARGO_WEB_BASE_URL": base, "EMBARGO_APPROVAL_REQUIRED": "true",
           "TMPDIR": str(private_tmp), "PYTHONPATH": str(ROOT)}
    from config.settings import load_settings
    from web.app import build_services

    settings = load_settings(environ=env)
    init_keys(settings.keys_dir)
    services = build_services(settings)
    _, one_time = accounts.add_user(services, name="editor", email="editor@press.example",
                                    role="editor", actor="test")
    who = accounts.sign_in(services, "editor", one_time, now=services.clock.now())
    accounts.change_password(services, who, old=one_time, new=PASSWORD,
                             now=services.clock.now())
    services.engine.dispose()
    server = subprocess.Popen([sys.executable, "-m", "jobs.cli", "web"], env=env, cwd=ROOT,
                              stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base}/sign-in", timeout=1)
            break
        except httpx.TransportError:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            time.sleep(0.1)
    try:
        yield base, server, data, private_tmp
    finally:
        server.terminate()
        server.wait(10)


def body(csrf: str, boundary: str) -> Iterator[bytes]:
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{csrf}\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"report\"; "
           f"filename=\"big-report.txt\"\r\nContent-Type: text/plain\r\n\r\n").encode()
    line = b"National report, embargoed: " + MARKER + b"\n"
    block = (line * (MIB // len(line) + 1))[:MIB]
    for _ in range(SIZE // MIB):
        yield block
    yield f"\r\n--{boundary}--\r\n".encode()


@pytest.mark.slow
def test_a_200_mib_upload_is_sealed_with_flat_memory_and_leaves_no_plaintext(
        console: tuple[str, subprocess.Popen[bytes], Path, Path]) -> None:
    base, server, data, private_tmp = console
    started = time.time()
    with httpx.Client(base_url=base, headers={"origin": base}, timeout=300) as client:
        assert client.post("/sign-in", data={"name": "editor",
                                             "password": PASSWORD}).status_code == 303
        page = client.get("/releases/new").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        made = client.post("/releases/new", data={
            "csrf": csrf, "title": "Big", "publish_on": "2030-09-04", "at": "00:01",
            "officers": "", "action": "create"}, files={"none": ("", b"")})
        assert made.status_code == 303, made.text
        release = made.headers["location"]
        client.get(release)  # warm: templates compiled, the sealing code imported
        reset_peak(server.pid)
        before = memory(server.pid, "VmRSS")
        sent = time.monotonic()
        response = client.post(f"{release}/documents", content=body(csrf, "BIGbound"),
                               headers={"content-type": "multipart/form-data; boundary=BIGbound"})
        seconds = time.monotonic() - sent
        assert response.status_code == 303, response.text[:2000]
        after = memory(server.pid, "VmHWM")
        page = client.get(release).text
    growth = after - before
    print(f"\n200 MiB upload: RSS {before / MIB:.1f} MiB before, peak {after / MIB:.1f} MiB "
          f"during, growth {growth / MIB:.1f} MiB; {seconds:.1f} s "
          f"({SIZE / MIB / seconds:.0f} MiB/s)")
    assert growth < 64 * MIB
    assert f"{SIZE:,}" in page  # the size recorded is the whole document's
    sealed = [p for p in data.rglob("*.emb")]
    assert len(sealed) == 1 and sealed[0].stat().st_size > SIZE
    for path in data.rglob("*"):
        if path.is_file():
            assert not contains(path, MARKER), path
    for path in private_tmp.rglob("*"):
        assert not (path.is_file() and contains(path, MARKER)), path
    # The system temp folder is shared (other tests' folders come and go while
    # we walk it): look at every file written since the upload began.
    for folder, _, names in os.walk(tempfile.gettempdir()):  # errors: skipped
        for name in names:
            path = Path(folder, name)
            try:
                fresh = path.is_file() and path.stat().st_mtime >= started
            except OSError:
                continue
            if fresh:
                assert not contains(path, MARKER), path
