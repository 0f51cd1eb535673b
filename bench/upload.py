"""Console uploads: the server's memory while a document streams in and is sealed.

    python bench/upload.py [--sizes 50,200,500]

Per size (MiB): a fresh data dir and a real ``embargo web`` child; an editor
signs in over HTTP, makes a draft, and uploads one report of that size as a
streamed multipart body (generated on the fly: the client holds 1 MiB). The
server's peak resident set is reset just before the upload (Linux
``/proc/PID/clear_refs`` "5", so the sign-in's argon2id does not hide the
upload's peak) and read (VmHWM) after it. Target: peak growth <= 64 MiB at
every size (memory flat: it must not grow with the size).
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from _common import (
    REPO,
    Cleanup,
    MiB,
    child_env,
    embargo_argv,
    free_port,
    machine,
    run_embargo,
    table,
    verdict,
    wait_port,
)

PASSWORD = "correct horse battery"
TARGET = 64 * MiB


def memory(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) * 1024


def body(csrf: str, boundary: str, size: int) -> Iterator[bytes]:
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{csrf}\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"report\"; "
           f"filename=\"report.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
           ).encode()
    block = bytes(range(256)) * (MiB // 256)
    for _ in range(size // MiB):
        yield block
    yield f"\r\n--{boundary}--\r\n".encode()


def one(cleanup: Cleanup, size: int) -> tuple[float, float, float, float]:
    data = cleanup.tempdir("upload")
    port = free_port()
    base = f"http://localhost:{port}"
    env = child_env({"EMBARGO_WEB_BIND": f"127.0.0.1:{port}", "EMBARGO_WEB_BASE_URL": base})
    run_embargo(data, "keys", "init", env=env)
    one_time = run_embargo(data, "users", "add", "ed", "ed@press.example", "--role", "editor",
                           env=env).stdout.strip().splitlines()[-1]
    server = cleanup.spawn(embargo_argv(data, "web"), cwd=REPO, env=env)
    wait_port(port, proc=server)
    with httpx.Client(base_url=base, headers={"origin": base}, timeout=600) as client:
        client.post("/sign-in", data={"name": "ed", "password": one_time})
        csrf = re.search(r'name="csrf" value="([^"]+)"',  # type: ignore[union-attr]
                         client.get("/password").text).group(1)
        client.post("/password", data={"csrf": csrf, "old": one_time, "new": PASSWORD,
                                       "again": PASSWORD})
        made = client.post("/releases/new", data={
            "csrf": csrf, "title": "Bench", "publish_on": "2035-09-04", "officers": "",
            "action": "create"}, files={"none": ("", b"")})
        release = made.headers["location"]
        client.get(release)
        Path(f"/proc/{server.pid}/clear_refs").write_text("5")
        before = memory(server.pid, "VmRSS")
        start = time.perf_counter()
        response = client.post(f"{release}/documents", content=body(csrf, "B0und", size),
                               headers={"content-type": "multipart/form-data; boundary=B0und"})
        seconds = time.perf_counter() - start
        if response.status_code != 303:
            raise RuntimeError(f"upload refused: {response.status_code}")
        peak = memory(server.pid, "VmHWM")
    cleanup.stop(server)
    return before / MiB, peak / MiB, (peak - before) / MiB, size / MiB / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,200,500", help="MiB, comma-separated")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with Cleanup() as cleanup:
        for mib in sizes:
            before, peak, growth, rate = one(cleanup, mib * MiB)
            rows.append((mib, f"{before:.1f}", f"{peak:.1f}", f"{growth:.1f}", f"{rate:.0f}",
                         verdict(growth * MiB <= TARGET)))
    print(machine())
    print(table(rows, ["MiB", "RSS before", "peak during", "growth (MiB)", "MiB/s",
                       "<= 64 MiB"], title="console upload, sealed as it streams in"))


if __name__ == "__main__":
    main()
