"""Adapter registry (register / rename / delete / zip), name and folder checks, merging."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from apptools import make_lora_adapter
from rpo_app import adapters
from rpo_app.adapters import AdapterError
from rpo_app.config import DataLayout


@pytest.fixture(scope="module")
def adapter_src(tiny_model_dir, tmp_path_factory) -> Path:
    return make_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("adp") / "adapter")


@pytest.fixture
def layout(data_dir) -> DataLayout:
    return DataLayout(data_dir)


@pytest.fixture
def run_dir(tmp_path, adapter_src) -> Path:
    import shutil

    run = tmp_path / "run-abc"
    run.mkdir()
    shutil.copytree(adapter_src, run / "adapter")
    return run


def test_register_rename_zip_delete(store, layout, run_dir, tiny_model_dir, tmp_path):
    rec = adapters.register_from_run(store, layout, run_dir, "tuned-1",
                                     base_model=str(tiny_model_dir))
    folder = layout.adapters / "tuned-1"
    assert rec["name"] == "tuned-1" and Path(rec["path"]) == folder
    assert rec["base_model"] == str(tiny_model_dir) and rec["run_id"] is None
    assert (folder / "adapter_config.json").is_file()
    assert (folder / "adapter_model.safetensors").is_file()
    assert [p.name for p in layout.adapters.iterdir()] == ["tuned-1"]  # no temp folder left
    assert [(a["name"], a["exists"]) for a in adapters.list_adapters(store)] == [("tuned-1", True)]
    with pytest.raises(AdapterError, match="already exists"):
        adapters.register_from_run(store, layout, run_dir, "tuned-1")

    rec = adapters.rename(store, layout, "tuned-1", "tuned-2")
    assert rec["name"] == "tuned-2" and Path(rec["path"]) == layout.adapters / "tuned-2"
    assert not folder.exists() and (layout.adapters / "tuned-2" / "adapter_config.json").is_file()
    assert store.adapter("tuned-1") is None
    adapters.register_from_run(store, layout, run_dir, "other")
    with pytest.raises(AdapterError, match="already exists"):
        adapters.rename(store, layout, "tuned-2", "other")
    with pytest.raises(AdapterError, match="no adapter"):
        adapters.rename(store, layout, "missing", "x")

    zpath = adapters.export_zip(layout, "tuned-2", tmp_path / "out" / "t.zip")
    with zipfile.ZipFile(zpath) as zf:
        names = set(zf.namelist())
        assert {"tuned-2/adapter_config.json", "tuned-2/adapter_model.safetensors"} <= names
        cfg = json.loads(zf.read("tuned-2/adapter_config.json"))
    assert cfg["peft_type"] == "LORA"
    default_zip = adapters.export_zip(layout, "tuned-2")
    assert default_zip.parent == layout.exports and default_zip.is_file()

    adapters.delete(store, layout, "tuned-2")
    assert store.adapter("tuned-2") is None
    assert sorted(p.name for p in layout.adapters.iterdir()) == ["other"]
    with pytest.raises(AdapterError, match="no adapter"):
        adapters.delete(store, layout, "tuned-2")
    assert (run_dir / "adapter" / "adapter_config.json").is_file()  # the run keeps its copy


def test_register_links_the_run_and_overwrite(store, layout, run_dir):
    store.record_run(run_dir.name, {"lr": 1}, str(run_dir), state="finished")
    rec = adapters.register_from_run(store, layout, run_dir, "from-run")
    assert rec["run_id"] == run_dir.name
    assert rec["base_model"]  # taken from adapter_config.json
    rec = adapters.register_from_run(store, layout, run_dir, "from-run", overwrite=True)
    assert rec["name"] == "from-run"
    assert sorted(p.name for p in layout.adapters.iterdir()) == ["from-run"]


def test_delete_keeps_folders_outside_the_adapters_dir(store, layout, run_dir):
    store.register_adapter("in-place", str(run_dir / "adapter"), None, None)
    adapters.rename(store, layout, "in-place", "moved-name")
    assert store.adapter("moved-name")["path"] == str(run_dir / "adapter")
    adapters.delete(store, layout, "moved-name")
    assert store.adapter("moved-name") is None
    assert (run_dir / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", ".hidden", "a\\b", "x" * 65])
def test_bad_names_refused(store, layout, run_dir, bad):
    with pytest.raises(ValueError, match="invalid adapter name"):
        adapters.register_from_run(store, layout, run_dir, bad)
    adapters.register_from_run(store, layout, run_dir, "good")
    with pytest.raises(ValueError, match="invalid adapter name"):
        adapters.rename(store, layout, "good", bad)
    with pytest.raises(ValueError, match="invalid adapter name"):
        adapters.delete(store, layout, bad)
    with pytest.raises(ValueError, match="invalid adapter name"):
        adapters.export_zip(layout, bad)
    assert sorted(p.name for p in layout.adapters.iterdir()) == ["good"]
    assert not (layout.root / "x").exists()


def _broken(tmp_path, adapter_src, kind: str) -> Path:
    import shutil

    d = tmp_path / kind
    shutil.copytree(adapter_src, d)
    if kind == "no-config":
        (d / "adapter_config.json").unlink()
    elif kind == "bad-json":
        (d / "adapter_config.json").write_text("{not json")
    elif kind == "not-peft":
        (d / "adapter_config.json").write_text('{"hello": 1}')
    elif kind == "no-weights":
        (d / "adapter_model.safetensors").unlink()
    elif kind == "garbage-weights":
        (d / "adapter_model.safetensors").write_bytes(b"\x00" * 5 + b"garbage")
    elif kind == "pickle":
        (d / "adapter_model.safetensors").unlink()
        (d / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    return d


@pytest.mark.parametrize("kind,message", [
    ("no-config", "no adapter_config.json"),
    ("bad-json", "not valid JSON"),
    ("not-peft", "not a PEFT adapter config"),
    ("no-weights", "no adapter_model.safetensors"),
    ("garbage-weights", "not a readable safetensors file"),
    ("pickle", "pickled weights"),
])
def test_corrupt_adapter_refused(store, layout, tmp_path, adapter_src, kind, message):
    broken = _broken(tmp_path, adapter_src, kind)
    with pytest.raises(AdapterError, match=message):
        adapters.check_adapter_dir(broken)
    run = tmp_path / f"run-{kind}"
    run.mkdir()
    broken.rename(run / "adapter")
    with pytest.raises(AdapterError, match=message):
        adapters.register_from_run(store, layout, run, "broken")
    assert store.adapter("broken") is None
    assert not layout.adapters.exists() or not any(layout.adapters.iterdir())


def test_resolve_adapter(store, layout, run_dir, adapter_src):
    adapters.register_from_run(store, layout, run_dir, "named")
    name, folder = adapters.resolve_adapter(store, layout, "named")
    assert name == "named" and folder == layout.adapters / "named"
    name, folder = adapters.resolve_adapter(store, layout, str(adapter_src))
    assert name == "adapter" and folder == adapter_src
    with pytest.raises(AdapterError, match="no adapter named"):
        adapters.resolve_adapter(store, layout, "missing")
    with pytest.raises(AdapterError, match="does not exist"):
        adapters.resolve_adapter(store, layout, "../x")


def test_merge_matches_peft_logits(tiny_model_dir, adapter_src, tmp_path, data_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = adapters.merge(adapter_src, tmp_path / "merged", base_model=str(tiny_model_dir),
                         data_dir=data_dir)
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert list(out.glob("*.safetensors")) and not (out / "adapter_config.json").exists()
    assert not list(tmp_path.glob(".merged*"))  # no temp folder left behind

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                           adapter_src).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[1, 57, 2049, 300, 9, 17, 4412, 88]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        base = plain(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(base, want, atol=1e-3)  # the adapter does something

    with pytest.raises(AdapterError, match="not empty"):
        adapters.merge(adapter_src, out, base_model=str(tiny_model_dir), data_dir=data_dir)


def test_cli_merge_by_name(store, layout, run_dir, tiny_model_dir, tmp_path, capsys):
    from rpo_app.cli import main

    adapters.register_from_run(store, layout, run_dir, "tuned")
    out = tmp_path / "merged-cli"
    rc = main(["merge", "--adapter", "tuned", "--out", str(out), "--model", str(tiny_model_dir),
               "--data-dir", str(layout.root)])
    assert rc == 0 and (out / "config.json").is_file()
    rc = main(["merge", "--adapter", "../evil", "--out", str(tmp_path / "m2"),
               "--data-dir", str(layout.root)])
    assert rc == 2 and "error:" in capsys.readouterr().err


def test_the_chat_tabs_exports_leave_only_the_zip_and_clear_earlier_ones(data_dir, tiny_model_dir,
                                                                         adapter_src, monkeypatch):
    """Gradio copies a download into its own cache as it serves it: a merged export keeps
    its zip only, and a later export removes the earlier ones' temp folders."""
    from rpo_app.config import ServeConfig
    from rpo_app.ui import chat
    from rpo_app.ui.context import AppContext

    ctx = AppContext(ServeConfig(data_dir=data_dir, model=str(tiny_model_dir)), load_model=False)
    ctx.store.register_adapter("tuned", str(adapter_src), None, str(tiny_model_dir))
    first = Path(chat.export_merged(ctx, "tuned", progress=lambda *a, **k: None))
    with zipfile.ZipFile(first) as z:
        assert "config.json" in z.namelist() and any(n.endswith(".safetensors") for n in z.namelist())
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # the merged folder is gone
    second = Path(chat.export_merged(ctx, "tuned", progress=lambda *a, **k: None))
    assert first.is_file() and second.is_file()  # a minute old at most: maybe not served yet
    monkeypatch.setattr(ctx.downloads, "KEEP_S", 0.0)
    third = Path(chat.export_merged(ctx, "tuned", progress=lambda *a, **k: None))
    assert third.is_file() and not first.parent.exists() and not second.parent.exists()
    assert list(third.parent.parent.iterdir()) == [third.parent]  # the app's one downloads folder
    shutil.rmtree(third.parent.parent)  # what the app does at exit


def test_sigterm_ends_the_app_and_takes_its_downloads_with_it():
    """`kill` ends the app at once and ran no exit handler, so a merged model's zip stayed
    in the temp folder; the app now removes its downloads first and ends as SIGTERM does."""
    import signal
    import subprocess
    import sys
    import textwrap

    from apptools import REPO

    code = textwrap.dedent("""
        import os, signal, time
        from rpo_app.ui.app import remove_downloads_on_sigterm
        from rpo_app.ui.context import Downloads
        downloads = Downloads()
        folder = downloads.folder("merged-")
        (folder / "tuned-merged.zip").write_bytes(b"a model's size")
        print(folder, flush=True)
        remove_downloads_on_sigterm(downloads)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    folder = Path(out.stdout.strip())
    assert out.returncode == -signal.SIGTERM, out.stderr
    assert folder.parent.name.startswith("rpo-downloads-") and not folder.parent.exists()
