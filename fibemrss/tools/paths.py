"""Where the tools find the repository and the shared data beside it."""

from __future__ import annotations

from pathlib import Path

# fibemrss/tools/paths.py -> the repository root (a source checkout; installed copies use the CWD).
REPO_ROOT = Path(__file__).resolve().parents[2]
# ../shared/data beside the checkout, as the design card lays it out.
DEFAULT_SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
