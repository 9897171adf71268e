"""Local copies of Hub repositories, in the Hub's own layout, so that the Hub code paths run offline.

* Models: a ``save_pretrained`` / timm ``save_for_hf`` folder is placed in a Hugging Face cache
  (``models--org--name/refs/main`` and ``snapshots/<commit>/``) and ``huggingface_hub`` is switched to
  offline mode, so ``from_pretrained("org/name")`` and ``timm.create_model("hf-hub:org/name")`` resolve
  the id exactly as they do after a real download.
* Datasets: ``datasets`` cannot load a Hub dataset from that cache offline, so
  ``datasets.load_dataset("org/name", ...)`` is redirected to a local folder holding the repository's
  files (data files at the Hub's paths and, where the Hub has one, a README ``configs:`` block).
  Everything after the name is resolved (configs, splits, streaming, columns) is the real code.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex revision; refs/main points to it


class HubCache:
    """An offline Hugging Face cache under ``root``; ``publish`` adds repositories to it."""

    def __init__(self, root: Path, monkeypatch) -> None:
        import datasets.config
        import huggingface_hub.constants as constants

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(self.root))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at call time by huggingface_hub,
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # transformers, timm and datasets
        self._datasets: dict[str, Path] = {}
        self._monkeypatch = monkeypatch

    def publish(self, repo_id: str, folder: Path) -> Path:
        """Make the files of ``folder`` the ``main`` revision of model ``repo_id``; returns the snapshot."""
        repo = self.root / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(COMMIT)
        snapshot = repo / "snapshots" / COMMIT
        shutil.copytree(folder, snapshot, dirs_exist_ok=True)
        return snapshot

    def serve_dataset(self, repo_id: str, folder: Path) -> None:
        """``datasets.load_dataset(repo_id, ...)`` reads the local ``folder`` (never the network)."""
        import datasets

        if not self._datasets:
            real = datasets.load_dataset

            def load_dataset(path, *args, **kwargs):
                return real(str(self._datasets.get(path, path)), *args, **kwargs)

            self._monkeypatch.setattr(datasets, "load_dataset", load_dataset)
        self._datasets[repo_id] = Path(folder)


def write_json_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def write_parquet(path: Path, rows: list[dict]) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))


def readme_configs(folder: Path, configs: dict[str, dict[str, str]]) -> None:
    """A dataset card whose YAML ``configs:`` block maps config -> split -> data file glob (Hub syntax)."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        for split, pattern in splits.items():
            lines += [f"  - split: {split}", f"    path: {pattern}"]
    lines.append("---")
    (folder / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def c4_copy(folder: Path, train: list[str], validation: list[str]) -> Path:
    """``allenai/c4``: gzipped JSON lines per config folder; configs ``en`` and ``en.noblocklist`` (the
    latter holding the same documents upper-cased), each with train and validation."""
    meta = {"timestamp": "2019-04-25T12:57:54Z", "url": "https://example.org"}
    configs = {}
    for config, transform in (("en", str), ("en.noblocklist", str.upper)):
        for split, texts, shards in (("train", train, 1024), ("validation", validation, 8)):
            write_json_gz(
                folder / config / f"c4-{split}.00000-of-{shards:05d}.json.gz",
                [{"text": transform(t), **meta} for t in texts],
            )
            configs.setdefault(config, {})[split] = f"{config}/c4-{split}.*.json.gz"
    readme_configs(folder, configs)
    return folder


def codeparrot_copy(folder: Path, contents: list[str]) -> Path:
    """``codeparrot/codeparrot-clean``: gzipped JSON lines at the top, no card configs, one train split."""
    rows = [
        {"repo_name": f"org/repo{i}", "path": f"src/m{i}.py", "content": text, "license": "mit"}
        for i, text in enumerate(contents)
    ]
    write_json_gz(folder / "file-000000000001.json.gz", rows)
    return folder


def fineweb_copy(folder: Path, texts: list[str]) -> Path:
    """``HuggingFaceFW/fineweb``: parquet shards, config ``sample-10BT`` with a train split only."""
    write_parquet(
        folder / "sample" / "10BT" / "000_00000.parquet",
        [{"text": t, "id": f"<urn:{i}>", "language": "en"} for i, t in enumerate(texts)],
    )
    readme_configs(folder, {"sample-10BT": {"train": "sample/10BT/*"}})
    return folder
