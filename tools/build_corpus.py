"""Regenerate the bundled English corpus from the Debian package bible-kjv-text.

The King James Version (1611) is in the public domain; see esolm_dist/data/assets/README.md.
One document per chapter: the chapter title, then one verse per line (verse numbers dropped).
The output is byte-for-byte reproducible (gzip with no file name and mtime 0), so the
committed file only changes when the Debian text does.

    apt-get install -y bible-kjv-text     # also pulls in bible-kjv, the `bible` reader
    python tools/build_corpus.py --out esolm_dist/data/assets/corpus/kjv.jsonl.gz --overwrite
"""

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

WHOLE_BIBLE = "Gen1:1-Rev22:21"
EXPECTED_CHAPTERS = 1189
EXPECTED_VERSES = 31102
VERSE_LINE = re.compile(r"^\s+\d+ (.*)$")


def read_kjv_text() -> str:
    """Print the whole KJV with the `bible` program, one verse per line (-l0: no wrapping)."""
    if shutil.which("bible") is None:
        raise SystemExit("the `bible` program is missing: apt-get install -y bible-kjv-text")
    return subprocess.run(["bible", "-l0", WHOLE_BIBLE], check=True, capture_output=True,
                          text=True, encoding="ascii").stdout


def split_chapters(text: str) -> list[str]:
    """Turn `bible` output ("Genesis 1" headers, "  N verse" lines) into chapter documents."""
    chapters, title, verses = [], None, []
    for line in text.splitlines():
        verse = VERSE_LINE.match(line)
        if verse:
            verses.append(verse.group(1).strip())
        elif line.strip():
            if title is not None:
                chapters.append(title + "\n\n" + "\n".join(verses))
            title, verses = line.strip(), []
    chapters.append(title + "\n\n" + "\n".join(verses))
    return chapters


def write_jsonl_gz(documents: list[str], path: Path) -> None:
    """Write {"text": ...} lines, gzip-compressed with a fixed header so rebuilds are identical;
    atomic via a temp name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in documents)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                               compresslevel=9, mtime=0) as gz:
        gz.write(payload.encode("utf-8"))
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="output .jsonl.gz file (the bundled one: "
                             "esolm_dist/data/assets/corpus/kjv.jsonl.gz)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args()
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists; pass --overwrite to replace it")
    chapters = split_chapters(read_kjv_text())
    verses = sum(doc.count("\n") - 1 for doc in chapters)
    if len(chapters) != EXPECTED_CHAPTERS or verses != EXPECTED_VERSES:
        raise SystemExit(f"unexpected KJV text: {len(chapters)} chapters, {verses} verses "
                         f"(expected {EXPECTED_CHAPTERS}, {EXPECTED_VERSES})")
    write_jsonl_gz(chapters, args.out)
    print(f"wrote {args.out}: {len(chapters)} chapters, {verses} verses, "
          f"{args.out.stat().st_size / 1e6:.2f} MB compressed")


if __name__ == "__main__":
    main()
