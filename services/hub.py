"""Models and datasets by their Hugging Face hub ids (`org/name`, optionally `@revision`).

A model id resolves to a snapshot folder: downloaded when the hub is reachable, taken from the local cache
(`HF_HOME` / `HF_HUB_CACHE`) when it is not or when `HF_HUB_OFFLINE=1`. A dataset id resolves to its data files
(Parquet, JSONL, text) filtered by `data.subset` and `data.split`: on the hub they are read in place through
`hf://` (range reads, so a Parquet row group is fetched when a producer reaches it — nothing is downloaded
whole), offline from the cached snapshot. A name found in neither place is refused with what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from api.jobspec import HUB_ID, DataSpec

SPLIT_NAMES = ("train", "validation", "valid", "dev", "test")


def is_hub_id(name: str) -> bool:
    """`org/name[@revision]` that is not a local path (a relative path that exists is a path)."""
    return bool(HUB_ID.fullmatch(name)) and not Path(name).expanduser().exists()


def split_id(name: str) -> tuple[str, str | None]:
    repo, _, revision = name.partition("@")
    return repo, revision or None


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _refusal(field: str, name: str, kind: str, error: Exception) -> ValueError:
    reach = "the hub is not reached (HF_HUB_OFFLINE=1)" if offline() else f"the hub could not be reached ({error})"
    return ValueError(f"{field}: the {kind} {name!r} is not in the Hugging Face cache ({_cache_dir()}) and {reach}; "
                      f"download it where the hub is reachable (`hf download {split_id(name)[0]}"
                      f"{' --repo-type dataset' if kind == 'dataset' else ''}`) into the cache this server reads "
                      "(HF_HOME), or give a local path")


def _snapshot(name: str, repo_type: str, field: str, allow_patterns: list[str] | None = None) -> str:
    from huggingface_hub import snapshot_download

    repo, revision = split_id(name)
    kind = "model" if repo_type == "model" else "dataset"
    error: Exception | None = None
    if not offline():
        try:
            return snapshot_download(repo, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns)
        except Exception as failure:  # noqa: BLE001 - unreachable or unknown: the cache may still hold it
            error = failure
    try:
        return snapshot_download(repo, repo_type=repo_type, revision=revision, local_files_only=True)
    except Exception as failure:  # noqa: BLE001 - refused below with the name and the fix
        raise _refusal(field, name, kind, error or failure) from failure


def model_folder(name: str) -> str:
    """A local folder or .gguf file for `model.name`: the path itself, or the hub id's snapshot."""
    if not is_hub_id(name):
        return str(Path(name).expanduser())
    return _snapshot(name, "model", "model.name")


def _matches(relative: str, spec: DataSpec) -> bool:
    parts = relative.split("/")
    if spec.subset is not None and spec.subset not in parts[:-1]:
        return False
    return bool(re.search(rf"(^|[/_.-]){re.escape(spec.split)}([/_.-]|$)", relative))


def hub_dataset_files(spec: DataSpec) -> list[tuple[str, int]]:
    """(URI, size) of the dataset's data files for spec.split / spec.subset, sorted."""
    from services.data import DATA_SUFFIXES

    repo, revision = split_id(spec.source)
    listed: dict[str, tuple[str, int]] = {}  # path in the repo -> (URI, size)
    error: Exception | None = None
    if not offline():
        try:
            from huggingface_hub import HfFileSystem

            fs = HfFileSystem()
            root = f"datasets/{repo}" + (f"@{revision}" if revision else "")
            for path, info in fs.find(root, detail=True).items():
                relative = path[len(root):].lstrip("/")
                listed[relative] = (f"hf://{root}/{relative}", int(info.get("size") or 0))
        except Exception as failure:  # noqa: BLE001 - unreachable: the cache may hold a snapshot
            error, listed = failure, {}
    if not listed:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(repo, repo_type="dataset", revision=revision, local_files_only=True))
        except Exception as failure:  # noqa: BLE001 - refused with the name and the fix
            raise _refusal("data.source", spec.source, "dataset", error or failure) from failure
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                listed[path.relative_to(folder).as_posix()] = (str(path.resolve()), path.stat().st_size)
    data = {rel: v for rel, v in listed.items() if rel.endswith(DATA_SUFFIXES) and not rel.startswith(".")
            and Path(rel).name not in ("dataset_info.json", "dataset_dict.json", "state.json")}
    if not any(_matches(rel, spec.model_copy(update={"split": s})) for rel in data for s in SPLIT_NAMES):
        chosen = sorted(rel for rel in data if spec.subset is None or spec.subset in rel.split("/")[:-1])
        if spec.split != "train":  # files that name no split are all the train split
            chosen = []
    else:
        chosen = sorted(rel for rel in data if _matches(rel, spec))
    if not chosen:
        raise ValueError(f"data.split / data.subset: the dataset {spec.source!r} has no data file for split "
                         f"{spec.split!r}{f' of subset {spec.subset!r}' if spec.subset else ''} (files: "
                         f"{sorted(data)[:12]}); set data.split / data.subset to one it has")
    return [data[rel] for rel in chosen]
