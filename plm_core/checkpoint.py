"""Finds a PerceptionLM checkpoint: a local directory, or a hub id fetched with only the HF files.

The hub repos `facebook/Perception-LM-{1B,3B,8B}` also carry the original-format weights
(`consolidated.pth`, `params.json`); `ALLOW_PATTERNS` keeps the download to the Hugging Face files.
`HF_HUB_OFFLINE=1` (read by huggingface_hub itself) and `local_files_only` use the local cache only.
"""

from __future__ import annotations

import os
from pathlib import Path

from plm_core.model_config import ConfigError

ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
]

REQUIRED_FILES = ["config.json", "tokenizer.json"]
_TRUE = ("1", "true", "yes", "on")  # the values of HF_HUB_OFFLINE that mean offline


class CheckpointError(ConfigError):
    """The checkpoint cannot be found, downloaded, or is incomplete."""


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def resolve_checkpoint(
    model: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    progress: bool = True,
) -> Path:
    """Returns a local directory holding the checkpoint's HF files, downloading them if needed."""
    local = Path(os.path.expanduser(str(model)))
    if local.is_dir():
        if revision is not None:
            raise CheckpointError(
                f"--revision applies to hub ids, but {model} is a local directory"
            )
        check_files(local)
        return local
    model = str(model)
    if not _looks_like_hub_id(model):
        raise CheckpointError(
            f"{model} is neither a local directory nor a hub id like 'facebook/Perception-LM-1B'"
        )
    path = _download(
        model,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        progress=progress,
    )
    check_files(path)
    return path


def _download(
    repo_id: str,
    *,
    revision: str | None,
    cache_dir: str | None,
    local_files_only: bool,
    progress: bool,
) -> Path:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE
    if not progress:
        from huggingface_hub.utils.tqdm import disable_progress_bars

        disable_progress_bars()
    try:
        path = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=ALLOW_PATTERNS,
            local_files_only=offline,
        )
        return Path(path)
    except hf_errors.GatedRepoError as e:
        raise CheckpointError(
            f"{repo_id} is gated: accept its licence on the hub and log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from e
    except hf_errors.RepositoryNotFoundError as e:
        raise CheckpointError(
            f"hub repository {repo_id} not found (or not visible with your token)"
        ) from e
    except hf_errors.RevisionNotFoundError as e:
        raise CheckpointError(f"revision {revision!r} not found in {repo_id}") from e
    except hf_errors.LocalEntryNotFoundError as e:
        where = "HF_HUB_OFFLINE is set and " if offline else ""
        raise CheckpointError(
            f"{where}{repo_id} (revision {revision or 'main'}) is not in the local hub cache"
            " and could not be downloaded: " + str(e).splitlines()[0]
        ) from e
    except (OSError, hf_errors.HfHubHTTPError) as e:
        raise CheckpointError(f"could not download {repo_id}: {e}") from e


def check_files(path: Path) -> None:
    """Raises CheckpointError naming every missing file; the model type is checked by the config."""
    missing = [f for f in REQUIRED_FILES if not (path / f).exists()]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors (model weights)")
    if (
        not (path / "preprocessor_config.json").exists()
        and not (path / "processor_config.json").exists()
    ):
        missing.append("preprocessor_config.json")
    if missing:
        raise CheckpointError(f"checkpoint at {path} is incomplete: missing {', '.join(missing)}")
