"""Trained LoRA adapters: register, rename, delete, zip, merge.

Adapters live in `<data_dir>/adapters/<name>/` in the standard PEFT format
(adapter_config.json + adapter_model.safetensors) and are listed in the store's
adapters table. Folder changes are atomic: build next to the target, then rename.
Only safetensors weights are accepted: pickled weights can run code when loaded.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import uuid
import zipfile
from pathlib import Path

from rpo_app.config import DataLayout, check_name
from rpo_app.runfolder import LINEAGE_FILE

log = logging.getLogger(__name__)

# How the model without an adapter is named wherever models are listed or ranked. The
# space keeps it apart from every adapter name (check_name allows none).
BASE_LABEL = "base model"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class AdapterError(ValueError):
    """An adapter operation was refused; the message says why. Nothing was changed."""


def check_adapter_dir(path: str | os.PathLike) -> Path:
    """Return the folder if it holds a loadable PEFT adapter, else raise AdapterError."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickled:
        raise AdapterError(
            f"adapter folder {folder} holds pickled weights ({', '.join(pickled)}); only "
            f"safetensors are accepted (pickles can run code when loaded): re-save it with "
            f"save_pretrained(..., safe_serialization=True)")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterError(f"adapter folder {folder} has no {CONFIG_FILE}; "
                           "is it a PEFT adapter folder?")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{cfg_path} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise AdapterError(f"{cfg_path} is not a PEFT adapter config (no 'peft_type')")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"adapter folder {folder} has no {WEIGHTS_FILE}")
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            if not list(f.keys()):
                raise AdapterError(f"{weights} holds no tensors")
    except AdapterError:
        raise
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise AdapterError(f"{weights} is not a readable safetensors file: {err}") from err
    return folder


def adapter_config(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))


def _tmp_sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{uuid.uuid4().hex[:8]}")


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _registered_path(store, layout: DataLayout, name: str) -> Path | None:
    rec = store.adapter(name)
    if rec is not None:
        return Path(rec["path"])
    folder = layout.adapter_dir(name)
    return folder if folder.is_dir() else None


# -- the registry --------------------------------------------------------------------
def register_from_run(store, layout: DataLayout, run_dir: str | os.PathLike, name: str,
                      base_model: str | None = None, run_id: str | None = None,
                      overwrite: bool = False) -> dict:
    """Copy `run_dir/adapter` to adapters/<name> and list it in the store. The run's
    lineage.json goes with it: the adapter (and its zip) says what trained it."""
    name = check_name(name, "adapter name")
    src = check_adapter_dir(Path(run_dir) / "adapter")
    dest = layout.adapter_dir(name)
    if not overwrite and (dest.exists() or store.adapter(name) is not None):
        raise AdapterError(f"an adapter named {name!r} already exists; pick another name")
    if run_id is None and store.run(Path(run_dir).name) is not None:
        run_id = Path(run_dir).name
    if base_model is None:
        base_model = adapter_config(src).get("base_model_name_or_path")
    layout.adapters.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(dest, "tmp")
    old = _tmp_sibling(dest, "old")
    try:
        shutil.copytree(src, tmp)
        lineage = Path(run_dir) / LINEAGE_FILE
        if lineage.is_file():
            shutil.copy2(lineage, tmp / LINEAGE_FILE)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        store.register_adapter(name, str(dest), run_id, base_model)
    except Exception:
        shutil.rmtree(dest, ignore_errors=True)
        if old.exists():
            os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return store.adapter(name)


def rename(store, layout: DataLayout, old: str, new: str) -> dict:
    old = check_name(old, "adapter name")
    new = check_name(new, "adapter name")
    if old == new:
        raise AdapterError("the new name is the same as the old one")
    rec = store.adapter(old)
    if rec is None:
        raise AdapterError(f"no adapter named {old!r}")
    if store.adapter(new) is not None or layout.adapter_dir(new).exists():
        raise AdapterError(f"an adapter named {new!r} already exists")
    src = Path(rec["path"])
    # Only folders we own move; an adapter registered in place (a run's folder) keeps it.
    moves = src.is_dir() and _is_inside(src, layout.adapters)
    dest = layout.adapter_dir(new) if moves else src
    if moves:
        os.replace(src, dest)
    try:
        store.rename_adapter(old, new, str(dest))
    except Exception:
        if moves:
            os.replace(dest, src)
        raise
    return store.adapter(new)


def delete(store, layout: DataLayout, name: str) -> None:
    name = check_name(name, "adapter name")
    rec = store.adapter(name)
    folder = Path(rec["path"]) if rec else layout.adapter_dir(name)
    if rec is None and not folder.exists():
        raise AdapterError(f"no adapter named {name!r}")
    trash = None
    if folder.exists() and _is_inside(folder, layout.adapters):
        trash = _tmp_sibling(folder, "deleted")
        os.replace(folder, trash)
    try:
        store.delete_adapter(name)
    except Exception:
        if trash is not None:
            os.replace(trash, folder)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def list_adapters(store) -> list[dict]:
    """Registered adapters, oldest first, each with `exists` (its folder is there)."""
    out = []
    for rec in store.adapters():
        rec = dict(rec)
        rec["exists"] = (Path(rec["path"]) / CONFIG_FILE).is_file()
        out.append(rec)
    return out


def resolve_adapter(store, layout: DataLayout, name_or_dir: str) -> tuple[str, Path]:
    """(name, folder) for a registered name, a folder under adapters/, or a folder path."""
    value = (name_or_dir or "").strip()
    if not value:
        raise AdapterError("no adapter given")
    looks_like_path = os.sep in value or "/" in value or value.startswith(".")
    if not looks_like_path:
        name = check_name(value, "adapter name")
        folder = _registered_path(store, layout, name)
        if folder is None:
            raise AdapterError(f"no adapter named {name!r} (see the Adapters list, "
                               "or pass a folder path)")
        return name, check_adapter_dir(folder)
    folder = check_adapter_dir(value)
    # A folder path: its name only labels the answers it makes (provenance).
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", folder.resolve().name).strip(".-_") or "adapter"
    return check_name(label[:64].replace("..", "."), "adapter name"), folder


def export_zip(layout: DataLayout, name: str, out_path: str | os.PathLike | None = None) -> Path:
    """Zip adapters/<name>/ (entries under `<name>/`) for download."""
    folder = check_adapter_dir(layout.adapter_dir(name))
    out = Path(out_path) if out_path else layout.exports / f"adapter-{folder.name}.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(out, "tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    zf.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# -- merging ----------------------------------------------------------------------------
def _base_for(adapter_dir: Path, base_model: str | None) -> str | None:
    """The base model to merge into: the one asked for, else the adapter's own, falling
    back to the bundled default when the adapter names a converted copy that moved."""
    from rpo_app.models import DEFAULT_MODEL_NAME

    if base_model:
        return base_model
    recorded = adapter_config(adapter_dir).get("base_model_name_or_path")
    if not recorded:
        return None
    if Path(recorded).name == DEFAULT_MODEL_NAME and not Path(recorded).exists():
        return None
    return recorded


def merge(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
          base_model: str | None = None, data_dir: str | os.PathLike = "data",
          device: str = "cpu", trust_remote_code: bool = False) -> Path:
    """Fold the adapter into the base weights; write a plain model folder (safetensors
    + tokenizer) that `AutoModelForCausalLM.from_pretrained` loads without peft."""
    import torch
    from peft import PeftModel

    from rpo_app.models import load_model

    adapter_dir = check_adapter_dir(adapter_dir)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AdapterError(f"output {out} already exists and is not empty; choose a new folder")
    base = _base_for(adapter_dir, base_model)
    net, tok = load_model(base, data_dir, device=device, dtype=torch.float32,
                          trust_remote_code=trust_remote_code)
    try:
        peft_model = PeftModel.from_pretrained(net, str(adapter_dir), torch_device=str(device))
    except Exception as err:
        raise AdapterError(f"adapter {adapter_dir} does not fit base model {base or 'default'}: "
                           f"{err.__class__.__name__}: {str(err).splitlines()[0]}") from err
    merged = peft_model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(out, "tmp")
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "rpo_app_merge.json").write_text(json.dumps({
            "adapter": str(adapter_dir.resolve()),
            "base_model": base or "default",
            "adapter_config": adapter_config(adapter_dir),
        }, indent=2, default=str))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cli_merge(args) -> int:
    from rpo_app.config import resolve_data_dir
    from rpo_app.models import ModelLoadError
    from rpo_app.store import Store

    layout = DataLayout(resolve_data_dir(args.data_dir))
    store = Store(layout.root)
    try:
        _, folder = resolve_adapter(store, layout, args.adapter)
        out = merge(folder, args.out, base_model=args.model, data_dir=layout.root)
    except (AdapterError, ModelLoadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(f"merged {folder} into {out}")
    return 0
