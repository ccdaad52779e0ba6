"""Open a page in real headless Chromium (Debian's `chromium` package) with no network, run a small check in it once
every image has loaded, and return what the check saw. `.ci/run` installs Chromium on CI."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

# Appended to a copy of the page: after the load event (every image decoded or failed), count the images that
# loaded, the study table's body rows, and whether the table was laid out (rendered, not just parsed).
CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const table = document.getElementById("arms");
  const out = {
    title: document.title,
    images: images.length,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    arm_rows: table ? table.querySelectorAll("tbody tr").length : -1,
    table_height: table ? table.getBoundingClientRect().height : 0,
    arms: table ? Array.from(table.querySelectorAll("tbody tr td:first-child")).map(td => td.textContent) : [],
  };
  const pre = document.createElement("pre");
  pre.id = "llmstable-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: the page must not need the network
         "--virtual-time-budget=15000"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def check_page(page: Path, timeout: float = 120) -> dict:
    """Load `page` in headless Chromium and return the check's findings (raises if Chromium printed none)."""
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="llmstable-chromium-") as tmp:
        copy = Path(tmp) / "page.html"
        copy.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"), encoding="utf-8")
        profile = Path(tmp) / "profile"  # a fresh profile every time
        result = subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", copy.as_uri()],
                                capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "HOME": tmp})
    found = re.search(r'<pre id="llmstable-check">(.*?)</pre>', result.stdout, re.S)
    if not found:
        raise RuntimeError(f"chromium printed no check (exit {result.returncode}): {result.stderr[-2000:]}")
    return json.loads(html.unescape(found.group(1)))
