"""The README's results section is exactly what the committed benchmark JSON says (nothing typed by hand)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_results_match_the_committed_json():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "update_readme.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
