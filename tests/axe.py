"""axe-core (Deque's accessibility engine, MPL-2.0) run inside a Playwright page.

Not vendored: axe.min.js is 560 KB of minified third-party code, too large to review in this repository. It is
installed once, pinned, from the npm registry into a cache outside the repository (npm checks the registry's
sha512), and its SHA-256 is checked here too, so every run tests against exactly the same rules.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unavailable

AXE_VERSION = "4.11.0"
AXE_SHA256 = "e9e5863c33a874f09bc01acd9234b7e3c871479f5eef8802fa582544465e6d01"  # node_modules/axe-core/axe.min.js
CACHE = Path(os.environ.get("GUARDLOOP_AXE_CACHE", Path.home() / ".cache" / "guardloop" / f"axe-core-{AXE_VERSION}"))

# WCAG 2.0/2.1/2.2 A and AA plus axe's best practices; violations only (passes and "incomplete" are not failures).
RUN_AXE = """async () => {
  const result = await axe.run(document, {
    runOnly: { type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"] },
    resultTypes: ["violations"],
  });
  return result.violations.map((v) => ({
    id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map((n) => n.target.join(" ")),
  }));
}"""


@lru_cache(maxsize=1)
def axe_source() -> str:
    path = CACHE / "node_modules" / "axe-core" / "axe.min.js"
    if not path.exists():
        npm = shutil.which("npm")
        if npm is None:
            unavailable("axe-core", "npm is not installed (apt-get install npm), and axe-core is not cached")
        command = [npm, "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(CACHE)]
        done = subprocess.run(
            [*command, f"axe-core@{AXE_VERSION}"], capture_output=True, text=True, timeout=180, check=False
        )
        if done.returncode != 0 or not path.exists():
            unavailable("axe-core", f"npm install axe-core@{AXE_VERSION} failed: {done.stderr.strip()[-300:]}")
    source = path.read_bytes()
    if hashlib.sha256(source).hexdigest() != AXE_SHA256:
        pytest.fail(f"{path} is not axe-core {AXE_VERSION} as pinned (SHA-256 differs); delete {CACHE} to reinstall")
    return source.decode("utf-8")


def axe_violations(page: Any) -> list[dict[str, Any]]:
    """axe's violations on the page as it is now: id, impact, help text and the offending nodes' selectors.

    The script goes in through the DevTools protocol (page.evaluate), which the page's Content-Security-Policy
    does not govern, so the page is checked with its real CSP in force."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.evaluate(axe_source())
    return page.evaluate(RUN_AXE)
