"""Hub weights for the encoder presets: download once, pin by sha256, load the pinned local file.

A workflow runs ``python -m pipeline.features.weights prefetch --model NAME --cache-dir DIR`` once,
before the per-slide extraction jobs fan out: the weights file is downloaded (or an earlier download
verified) and ``DIR/NAME.lock.json`` records ``{name, repo, file, path, sha256, weights}``. Extraction
jobs then call :func:`resolve_locked` and load that local file (``weights=PATH``), so every job of a
cohort uses the same bytes and none of them touches the network.

Gated repositories (most pathology models) need a Hugging Face account that accepted the model's
licence on its hub page, and a read token of that account in ``HF_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..files import one_line, read_json, safe_name, sha256_file, write_json_atomic
from .catalog import PRESETS


class WeightsError(RuntimeError):
    """Weights could not be fetched or verified; the message is one line naming the repo."""


def lock_path(name: str, cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / f"{safe_name(name)}.lock.json"


def _reason(exc: BaseException, repo: str, gated: bool) -> str:
    from huggingface_hub import errors

    has_token = bool(os.environ.get("HF_TOKEN"))
    access = (f"accept the model's licence at https://huggingface.co/{repo} with your account and "
              f"{'check that HF_TOKEN is a read token of that account' if has_token else 'set HF_TOKEN to a read token of that account (HF_TOKEN is not set)'}")
    if isinstance(exc, errors.GatedRepoError):
        return f"gated repository, access refused: {access}"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"repository not found or not accessible{' (gated)' if gated else ''}: {access}"
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return "not in the local cache and the hub could not be reached (offline?)"
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return f"HTTP {status}: {access}"
    msg = f"{type(exc).__name__}: {one_line(str(exc), 200)}"
    return f"{msg}; {access}" if gated else msg


def download_weights(name: str, cache_dir: str | os.PathLike | None = None) -> tuple[str, str, str]:
    """Download the preset's weights file from the hub: ``(local path, repo, file)``.

    Uses ``huggingface_hub.hf_hub_download(repo, file, token=$HF_TOKEN)``; the preset's files are tried
    in order when one does not exist in the repo. Raises :class:`WeightsError` naming the repo.
    """
    import huggingface_hub
    from huggingface_hub import errors

    preset = PRESETS.get(name)
    if preset is None or not preset.hf_repo:
        raise WeightsError(f"{name}: no Hugging Face weights for this encoder")
    repo = preset.hf_repo
    absent = []
    for file in preset.hf_files:
        try:
            path = huggingface_hub.hf_hub_download(
                repo_id=repo, filename=file, token=os.environ.get("HF_TOKEN"),
                cache_dir=str(cache_dir) if cache_dir else None)
        except errors.RemoteEntryNotFoundError:
            absent.append(file)
            continue
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line naming the repo
            raise WeightsError(f"{name}: cannot download {file} from hf:{repo}: "
                               f"{_reason(exc, repo, preset.gated)}") from exc
        return str(path), repo, file
    raise WeightsError(f"{name}: none of {list(absent)} exists in hf:{repo}")


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: unreadable lock file ({exc}); delete it and prefetch again") from exc


def _non_hub_record(name: str, pretrained: bool = True) -> dict[str, Any]:
    """Lock for an encoder without hub weights: a builtin preset or a plain timm architecture. Its
    ``weights`` is timm's source when ``pretrained`` and timm knows one (timm fetches those itself, into
    its own cache, when the encoder is built), else ``"random"``."""
    import timm

    preset = PRESETS.get(name)
    arch = preset.arch if preset else name
    if preset is None and not timm.is_model(arch.split(".")[0]):
        from . import list_encoders

        raise WeightsError(f"{name}: unknown encoder (not a preset in {list_encoders()} nor a timm architecture)")
    src = None
    if not pretrained:
        return {"name": name, "repo": None, "file": None, "path": None, "sha256": None, "weights": "random"}
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
        src = (getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None)) if cfg else None
    except Exception:  # noqa: BLE001 - no pretrained config: random init
        src = None
    return {"name": name, "repo": None, "file": None, "path": None, "sha256": None,
            "weights": f"timm:{src}" if src else "random"}


def prefetch(name: str, cache_dir: str | os.PathLike, pretrained: bool = True) -> dict[str, Any]:
    """Download (or verify an earlier download of) ``name``'s weights and write ``cache_dir/NAME.lock.json``.

    Idempotent: when the lock exists and its file still has the locked sha256 nothing is downloaded.
    A file whose sha256 differs from the lock, or a re-download that differs from it, is an error (the
    pinned weights changed; delete the lock to accept new ones). Encoders without hub weights get a
    lock with ``"weights": "random"`` (always when ``pretrained`` is false) or their timm source, and
    no file. Hub presets always fetch their file (``pretrained`` only concerns the others).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_path(name, cache_dir)
    preset = PRESETS.get(name)
    if preset is None or not preset.hf_repo:
        rec = _non_hub_record(name, pretrained=pretrained)
        write_json_atomic(lock, rec)
        return rec
    old = _read_lock(lock)
    if old and old.get("path") and Path(old["path"]).is_file():
        sha = sha256_file(old["path"])
        if sha == old.get("sha256"):
            return old
        raise WeightsError(f"{name}: {old['path']} (hf:{old.get('repo')}) has sha256 {sha[:16]}..., the lock "
                           f"{lock} pins {str(old.get('sha256'))[:16]}...; delete the file or the lock")
    path, repo, file = download_weights(name, cache_dir=cache_dir / "hub")
    sha = sha256_file(path)
    if old and old.get("sha256") and old["sha256"] != sha:
        raise WeightsError(f"{name}: hf:{repo}/{file} now has sha256 {sha[:16]}..., the lock {lock} pins "
                           f"{old['sha256'][:16]}...; delete the lock to accept the new weights")
    rec = {"name": name, "repo": repo, "file": file, "path": str(Path(path).absolute()), "sha256": sha,
           "weights": {"source": f"hf:{repo}/{file}", "sha256": sha}}
    write_json_atomic(lock, rec)
    return rec


def resolve_locked(name: str, cache_dir: str | os.PathLike, verify: bool = False) -> str | None:
    """The pinned local weights file of ``name`` (from its lock in ``cache_dir``), or None when there is
    no lock or it pins no file. ``verify``: re-hash the file and raise if it differs from the lock."""
    rec = _read_lock(lock_path(name, cache_dir))
    if not rec or not rec.get("path"):
        return None
    path = Path(rec["path"])
    if not path.is_file():
        raise WeightsError(f"{name}: locked weights {path} (hf:{rec.get('repo')}) are missing; prefetch again")
    if verify and sha256_file(path) != rec.get("sha256"):
        raise WeightsError(f"{name}: {path} (hf:{rec.get('repo')}) does not match its locked sha256")
    return str(path)


def apply_lock(settings: dict[str, Any], lock_file: str | os.PathLike) -> dict[str, Any]:
    """Feature settings that load the weights file pinned by ``prefetch`` (``lock_file``) instead of
    contacting the hub; unchanged when the lock pins no file (timm-hosted or random weights)."""
    rec = read_json(lock_file, "weights lock file")
    if isinstance(rec, dict) and rec.get("path"):
        return {**settings, "weights": rec["path"], "pretrained": False}
    return settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.features.weights",
                                 description="Fetch and pin encoder weights from the Hugging Face hub.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prefetch", help="download/verify weights and write CACHE_DIR/NAME.lock.json")
    p.add_argument("--model", required=True, help="preset name or timm architecture")
    p.add_argument("--cache-dir", required=True, help="where the weights and the lock file go")
    p.add_argument("--no-pretrained", action="store_true",
                   help="for encoders without hub weights: record a random init instead of timm's source")
    args = ap.parse_args(argv)
    try:
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # no per-retry chatter: a failure is reported in one line below
    except ImportError:  # pragma: no cover
        pass
    try:
        rec = prefetch(args.model, args.cache_dir, pretrained=not args.no_pretrained)
    except (WeightsError, ValueError, OSError) as exc:
        msg = one_line(str(exc), 500).removeprefix(f"{args.model}: ")
        print(f"prefetch {args.model}: {msg}", file=sys.stderr)
        return 2
    print(json.dumps(rec, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
