"""The README as a contract: its two commands, its first snippet and its layout section."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(title):
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end >= 0 else None]


def _code_blocks(text, lang):
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_the_two_commands_stay_word_for_word():
    assert _code_blocks(_section("Install and run"), "bash")[-1] == (
        "pip install -e . && python train.py\n")
    assert _code_blocks(_section("Test"), "bash")[0] == (
        'pip install -e ".[test]" && python -m pytest\n')


def test_the_first_snippet_runs_and_prints_what_it_says(capsys):
    snippet = _code_blocks(README[:README.index("\n## ")], "python")[0]
    exec(compile(snippet, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    shape, rel = re.fullmatch(r"(\(5, 5, 1, 6\)) largest difference (\S+) of the largest entry\n",
                              printed).groups()
    assert float(rel) < 1e-5                                # float32: a few ulps, not a bug


def test_the_layout_section_matches_the_tree():
    block = _code_blocks(_section("Layout"), "")[0]
    words = set(re.findall(r"[\w./]+", block))
    for path in sorted((ROOT / "jaxcnn").glob("*.py")):
        assert f"jaxcnn/{path.name}" in words, f"README layout misses jaxcnn/{path.name}"
    for package in ("check", "data"):
        assert f"jaxcnn/{package}/" in words
        for path in sorted((ROOT / "jaxcnn" / package).glob("*.py")):
            assert path.stem in words, f"README layout misses jaxcnn/{package}/{path.name}"
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        assert path.name in words or f"benchmarks/{path.name}" in words, path.name
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        assert path.stem in words or path.stem.removeprefix("test_") in words, path.name
    for named in re.findall(r"(?:jaxcnn|benchmarks)/\w+\.py", block):   # and nothing extra
        assert (ROOT / named).exists(), f"README layout names {named}, which does not exist"
    assert (ROOT / "train.py").exists() and "train.py" in words
