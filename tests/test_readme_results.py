"""The generated results (README.md's summary, docs/results.md, docs/objectives.md's study table) are exactly
what the committed benchmark JSON says, ``--check`` notices when any of them is stale, and the README stays a
newcomer's page: short, its set-up command identical to CI's, every relative link resolving."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("README.md", "docs/results.md", "docs/objectives.md")


def _check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "bench" / "update_readme.py"), "--check"],
                          capture_output=True, text=True)


def test_readme_results_match_the_committed_json():
    proc = _check(ROOT)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def checkout(tmp_path):
    """A copy of what the generator reads and writes (bench/, README.md, docs/)."""
    shutil.copytree(ROOT / "bench", tmp_path / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    assert _check(tmp_path).returncode == 0
    return tmp_path


def _edit_a_generated_number(path: Path, begin: str, end: str) -> None:
    text = path.read_text()
    start, stop = text.index(begin), text.index(end)
    block = text[start:stop]
    m = re.search(r"\d+\.\d{3}", block)
    assert m, f"{path}: no number in its generated block"
    digit = "1" if m.group()[-1] != "1" else "2"
    edited = block[:m.end() - 1] + digit + block[m.end():]
    path.write_text(text[:start] + edited + text[stop:])


@pytest.mark.parametrize("name,begin,end", [
    ("README.md", "<!-- results:begin -->", "<!-- results:end -->"),
    ("docs/results.md", "<!-- results:begin -->", "<!-- results:end -->"),
    ("docs/objectives.md", "<!-- study:begin -->", "<!-- study:end -->"),
])
def test_check_fails_on_a_stale_file_and_the_generator_repairs_it(checkout, name, begin, end):
    path = checkout / name
    before = path.read_text()
    _edit_a_generated_number(path, begin, end)
    proc = _check(checkout)
    assert proc.returncode == 1 and name in proc.stderr, (proc.returncode, proc.stderr)
    subprocess.run([sys.executable, str(checkout / "bench" / "update_readme.py")], check=True)
    assert path.read_text() == before and _check(checkout).returncode == 0


def test_every_results_section_is_generated_into_docs_results():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import update_readme
    finally:
        sys.path.remove(str(ROOT / "bench"))
    doc = update_readme.render_results_doc()
    readme = update_readme.render()
    for section in (update_readme.demo_section, update_readme.study_section, update_readme.experiment_section,
                    update_readme.compute_section, update_readme.train_step_section, update_readme.gkd_step_section,
                    update_readme.sampler_section, update_readme.loss_memory_section,
                    update_readme.data_scale_section):
        text = section()
        assert text, section.__name__
        heading = text.splitlines()[0]
        assert heading in doc, heading
    assert update_readme.plan_section().splitlines()[0] in readme
    # headings name what ran and the machine class, never a local path or who ran it
    for line in (doc + readme).splitlines():
        if line.startswith("#"):
            assert not re.search(r"(^|[\s`(])/(tmp|work|home)/", line), line
            assert "engineer" not in line and "shared" not in line, line


def test_readme_is_short_and_keeps_ci_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# README command 2 (kept identical):") + 1]
    assert f"   {command}\n" in readme
    assert "   pip install -e . && dcd-jax demo\n" in readme


def test_tpu_guide_keeps_every_path_in_a_bucket():
    """Issue 33: the TPU guide's data, scores, models and outputs are gs:// URLs (``$B``), and it has
    no shared-filesystem step."""
    readme = (ROOT / "README.md").read_text()
    guide = readme[readme.index("## Guide: distill"):readme.index("\nGPU clusters:")]
    assert "B=gs://" in guide
    for key in re.findall(r"(?:--out|train\.out_dir=|data\.path=|data\.teacher_scores=|--model \w+=)\s*([^\s`]\S*)", guide):
        assert key.startswith("$B/"), key
    assert not re.search(r"gcsfuse|NFS|/mnt/", guide)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", path.read_text(), re.M)}


@pytest.mark.parametrize("name", ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_resolve(name):
    path = ROOT / name
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = path.parent / file if file else path
        assert dest.exists(), f"{name}: {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{name}: {target}"
