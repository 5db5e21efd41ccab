"""The demo model's corpus: the King James Bible, fetched through the Debian
package registry.

Debian's ``bible-kjv-text`` holds the text (public domain: the translation
dates from 1611) and ``bible-kjv`` the ``bible`` program that dumps it. Both
are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into a
cache directory: nothing is installed on the system. The dump is parsed into
verses once and cached as JSON.
"""
from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("bible-kjv", "bible-kjv-text")
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".tools" / "kjv"
LICENSE = (
    "The King James Version (1611) is in the public domain (its copyright has expired; "
    "see /usr/share/doc/bible-kjv-text/copyright of Debian's bible-kjv-text package)."
)

_VERSE_LINE = re.compile(r"^\s+(\d+) (.*)$")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


@dataclass(frozen=True)
class Verse:
    ref: str  # "Genesis 1:1"
    text: str  # one line, single spaces


def _run(cmd: list[str], cwd: Path, stdout=subprocess.DEVNULL) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, stdout=stdout, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise RuntimeError(f"{cmd[0]} not found: fetching the KJV corpus needs a Debian-based system (apt-get, dpkg-deb)") from None
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{' '.join(cmd)} failed: {e.stderr.decode(errors='replace').strip()}") from None


def fetch_dump(cache: Path = DEFAULT_CACHE) -> Path:
    """Returns the path of the plain-text dump of the whole Bible, fetching
    and unpacking the Debian packages first if the cache lacks it."""
    cache.mkdir(parents=True, exist_ok=True)
    dump = cache / "kjv.txt"
    if dump.is_file():
        return dump
    root = cache / "root"
    if not (root / "usr" / "bin" / "bible").is_file():
        if not all(list(cache.glob(f"{p}_*.deb")) for p in PACKAGES):
            _run(["apt-get", "download", *PACKAGES], cache)
        for deb in sorted(cache.glob("*.deb")):
            _run(["dpkg-deb", "-x", deb.name, str(root)], cache)
    tmp = dump.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        _run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-d", "bible.data",
              "gen1:1-rev22:21"], cache, stdout=f)
    tmp.rename(dump)
    return dump


def parse_dump(text: str) -> list[Verse]:
    """The ``bible`` dump: a chapter heading ("1 Samuel 3") between blank
    lines, then verses "  N text" whose long lines wrap unindented."""
    verses: list[Verse] = []
    chapter, number, parts = None, None, []

    def flush() -> None:
        if number is not None:
            verses.append(Verse(f"{chapter}:{number}", " ".join(" ".join(parts).split())))

    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        m = _VERSE_LINE.match(line)
        if m:
            flush()
            number, parts = int(m.group(1)), [m.group(2)]
        elif i > 0 and not lines[i - 1].strip() and i + 1 < len(lines) and not lines[i + 1].strip():
            flush()
            chapter, number, parts = line.strip(), None, []
        else:
            parts.append(line.strip())
    flush()
    return verses


def load_verses(cache: Path = DEFAULT_CACHE) -> list[Verse]:
    """All 31,102 verses in canonical order (cached as verses.json)."""
    cached = cache / "verses.json"
    if cached.is_file():
        return [Verse(*v) for v in json.loads(cached.read_text())]
    verses = parse_dump(fetch_dump(cache).read_text())
    if len(verses) != 31102:
        raise RuntimeError(f"parsed {len(verses)} verses from the KJV dump, expected 31102")
    cached.write_text(json.dumps([[v.ref, v.text] for v in verses]))
    return verses


def words(text: str) -> list[str]:
    """Lower-cased words of a text, punctuation dropped ("LORD's" -> "lord's")."""
    return [w.lower() for w in _WORD.findall(text)]


def corpus_vocabulary(verses: list[Verse]) -> set[str]:
    return {w for v in verses for w in words(v.text)}
