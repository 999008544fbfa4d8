"""Pages loaded in real headless Chromium (Debian's `chromium`, which `make deps` installs where it is missing), and
the `data-*` values read back out of the DOM the browser built."""

from __future__ import annotations

import shutil
import tempfile
from html.parser import HTMLParser

import anyio

# As the machine's own check starts it: no sandbox as root, and no background networking (the network is closed,
# and Chromium's own connections would be refused many at a time).
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
)  # fmt: skip


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("Chromium is not installed: `make deps` installs Debian's chromium package")
    return found


async def rendered_dom(url: str, *, timeout_s: float = 120) -> str:
    """The DOM Chromium built from `url`, serialised (`--dump-dom`). Run as a process: the page's server may share
    this event loop."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile, anyio.fail_after(timeout_s):
        done = await anyio.run_process([chromium(), *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                                       check=False)  # fmt: skip
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr.decode(errors='replace')[-2000:]}")
    return done.stdout.decode()


class Elements(HTMLParser):
    """Every element's attributes and text, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str], list[str]]] = []
        self._open: list[int] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, {k: v or "" for k, v in attrs}, []))
        if tag not in ("br", "meta", "link", "img", "input", "line", "polyline", "hr"):
            self._open.append(len(self.found) - 1)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            index = self._open.pop()
            if self.found[index][0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for index in self._open:
            self.found[index][2].append(data)

    def text(self, element_id: str) -> str:
        return "".join(next(t for _, a, t in self.found if a.get("id") == element_id)).strip()

    def values(self, **wanted: str) -> list[str]:
        """`data-value` of the elements whose `data-<key>` attributes equal `wanted`."""
        return [a.get("data-value", "") for _, a, _ in self.found
                if all(a.get(f"data-{k}") == v for k, v in wanted.items())]  # fmt: skip

    def attributes(self, name: str) -> list[str]:
        return [a[name] for _, a, _ in self.found if name in a]


def parse(dom: str) -> Elements:
    parser = Elements()
    parser.feed(dom)
    parser.close()
    return parser
