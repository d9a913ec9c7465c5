"""The documentation stays true: the README is short and opens with the set-up and test commands, every script has a
page with the same eight sections, every relative link and anchor resolves, and every training command in the README
and the pages parses and passes its script's checks (the bad-input table is run by tests/test_readme.py, the logged
tags of each page are checked against a real run by each script's smoke test)."""
import glob
import importlib
import os
import re
import shlex

import pytest

from conftest import REPO

SCRIPTS = ("dqn_atari_hr.py", "ppo_atari_hr.py", "pqn_atari_hr.py", "drq_dmc_dominance.py", "simbav2_dmc_hr.py",
           "mrq_dmc_hr.py")
SECTIONS = ["1. Overview", "2. Usage", "3. Implemented variants", "4. Logged metrics", "5. Implementation details",
            "6. Fidelity", "7. Cost", "8. Results"]
PAGES = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]


def read(path, root=REPO):
    with open(os.path.join(root, path)) as f:
        return f.read()


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, markup dropped, punctuation other than '-' and '_' dropped, spaces to
    '-'."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str, root=REPO) -> set:
    """The anchors of a Markdown file's headings (outside code blocks); a repeated heading gets -1, -2, ..."""
    seen, out = {}, set()
    in_code = False
    for line in read(path, root).splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and not in_code:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(path: str, root=REPO):
    """Targets of the Markdown links [x](target) of a file, outside code blocks and code spans."""
    text = re.sub(r"```.*?```", "", read(path, root), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def broken_links(page: str, root=REPO) -> list:
    """Every relative link of `page` whose file does not exist, or whose #anchor is no heading of that file."""
    broken = []
    for target in links(page, root):
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not ours to check offline
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(root, resolved)):
            broken.append(f"{target}: no file {resolved}")
        elif anchor and (not resolved.endswith(".md") or anchor not in anchors(resolved, root)):
            broken.append(f"{target}: no heading '#{anchor}' in {resolved}")
    return broken


def test_readme_is_short_and_opens_with_the_two_commands():
    text = read("README.md")
    assert len(text.splitlines()) <= 250
    first = text.split("```", 2)[1].splitlines()[1:]
    assert [line for line in first if line.strip()] == ["pip install -r requirements.txt", "python -m pytest -q"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_has_a_page_with_the_eight_sections_in_order(script):
    page = f"docs/{script[:-3]}.md"
    headings = re.findall(r"^## (.*)$", read(page), flags=re.M)
    assert headings == SECTIONS, (page, headings)
    assert f"({script[:-3]}.md)" in read("docs/README.md") and f"(docs/{script[:-3]}.md)" in read("README.md")


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_and_anchor_resolves(page):
    assert not broken_links(page), f"{page}: {broken_links(page)}"


def test_the_link_checker_catches_broken_files_and_anchors(tmp_path):
    assert slug("Checkpoints and resume") == "checkpoints-and-resume"
    assert slug("SimbaV2 + HR (`simbav2_dmc_hr.py`)") == "simbav2--hr-simbav2_dmc_hrpy"
    assert slug("Analysis: from `runs/` to the papers' tables") == "analysis-from-runs-to-the-papers-tables"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## 2. Usage\n\n```\n# not a heading\n```\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md) [ok](docs/a.md#2-usage) [ok](#top) [web](https://example.org/x#y) `[code](nofile.md)`\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#usage) [code block](docs/a.md#not-a-heading)\n# Top\n")
    assert broken_links("README.md", str(tmp_path)) == [
        "docs/b.md: no file docs/b.md", "docs/a.md#usage: no heading '#usage' in docs/a.md",
        "docs/a.md#not-a-heading: no heading '#not-a-heading' in docs/a.md"]


def commands():
    """(page, script, argv) of every `python <script>.py ...` command in the README and the pages, `{a,b}` expanded."""
    out = []
    for page in PAGES:
        for cmd in re.findall(r"python ((?:%s)[^`\n|#]*)" % "|".join(re.escape(s) for s in SCRIPTS), read(page)):
            words = shlex.split(cmd)
            expanded = [[]]
            for w in words:
                m = re.fullmatch(r"\{([^}]*)\}", w)
                expanded = [e + [v] for e in expanded for v in (m.group(1).split(",") if m else [w])]
            out += [(page, e[0], e[1:]) for e in expanded]
    return out


COMMANDS = commands()


def test_the_pages_hold_commands():
    for script in SCRIPTS:
        assert any(p == f"docs/{script[:-3]}.md" and s == script for p, s, _ in COMMANDS), script


@pytest.mark.parametrize("page,script,argv", COMMANDS, ids=[f"{p}:{s[:4]}:{' '.join(a)}" for p, s, a in COMMANDS])
def test_every_documented_command_parses_and_passes_the_scripts_checks(page, script, argv):
    module = importlib.import_module(script[:-3])
    import harness
    if "--help" in argv:
        assert "--env-id" in harness.help_text(module.Args)
        return
    args = harness.cli(module.Args, [a for a in argv if a != "--resume"])
    module.validate(args)


def test_every_script_file_named_in_the_docs_exists():
    missing = []
    for page in PAGES:
        spans = re.findall(r"`([^`]*)`", re.sub(r"```.*?```", lambda m: m.group(0).replace("```", ""), read(page),
                                                  flags=re.S))
        for name in re.findall(r"\b(scripts/[\w./-]+\.(?:py|sh|sbatch))", " ".join(spans)):
            if not os.path.exists(os.path.join(REPO, name)):
                missing.append((page, name))
    assert not missing


def test_the_tag_check_catches_an_undocumented_and_an_unwritten_tag():
    """conftest.check_documented_tags, which every smoke test calls with the tags its run wrote."""
    from conftest import check_documented_tags, documented_tags
    rows = documented_tags("dqn_atari_hr.py")
    assert any(re.fullmatch(r, "representation/conv1/srank") for r, _ in rows)
    assert any(re.fullmatch(r, "representation/critic/block0/hidden/srank")
               for r, _ in documented_tags("simbav2_dmc_hr.py"))
    written = {"charts/SPS", "charts/epsilon", "charts/learning_rate", "losses/td_loss", "losses/q_values",
               "representation/hidden_bias", "representation/live_contribution",
               *(f"representation/latent/{k}" for k in ("dormant_kde", "dormant_score", "srank", "max_score",
                                                          "saturated", "zombie"))}
    check_documented_tags("dqn_atari_hr.py", written)  # eval/ and the episode tags are 'only with'
    with pytest.raises(AssertionError, match="does not list"):
        check_documented_tags("dqn_atari_hr.py", written | {"losses/new_loss"})
    with pytest.raises(AssertionError, match="did not write"):
        check_documented_tags("dqn_atari_hr.py", written - {"charts/epsilon"})
