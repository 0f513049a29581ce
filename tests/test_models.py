"""The default model (SmolLM2 from the bundled GGUF, converted once) and model loading."""
from __future__ import annotations

import json

import pytest

from rpo_app.models import (DEFAULT_MODEL_NAME, ModelLoadError, load_model, pick_device,
                            pick_dtype, resolve_model)

pytestmark = pytest.mark.slow


def test_default_model_folder_is_plain_safetensors_with_chat_template(default_model_dir):
    assert default_model_dir.name == DEFAULT_MODEL_NAME
    assert (default_model_dir / "model.safetensors").exists()
    assert not list(default_model_dir.glob("*.bin"))
    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (default_model_dir / "tokenizer.json").exists()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    assert tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "Hi" in text and text.rstrip().endswith("assistant")


def test_default_model_answers_a_question(model_cache_dir, default_model_dir):
    import torch

    model, tok = load_model(None, data_dir=model_cache_dir)
    assert not getattr(model.config, "quantization_config", None)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() and "Paris" in answer, answer


def test_unknown_model_offline_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model-xyz"):
        load_model("no-such-org/no-such-model-xyz", data_dir=tmp_path)
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path / "empty-folder"), tmp_path)


def test_device_and_dtype_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU-only expectations")
    assert pick_device() == "cpu"
    assert pick_device("cpu") == "cpu"
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        pick_device("cuda")
    assert pick_dtype("cpu") == torch.float32


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _model_folder_without_safetensors(tiny_model_dir, tmp_path, marker):
    import pickle
    import shutil

    folder = tmp_path / "pickled-model"
    shutil.copytree(tiny_model_dir, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Payload(str(marker))}))
    return folder


def test_pickled_weights_are_never_loaded(tiny_model_dir, tmp_path):
    marker = tmp_path / "pwned"
    folder = _model_folder_without_safetensors(tiny_model_dir, tmp_path, marker)
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(str(folder), data_dir=tmp_path)
    assert not marker.exists()


def test_model_code_in_a_folder_never_runs_without_the_flag(tiny_model_dir, tmp_path):
    import shutil

    marker = tmp_path / "pwned"
    folder = tmp_path / "custom-code-model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig",
                          "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    # Without --trust-remote-code the folder's own Python never runs: transformers builds
    # its built-in class for the model type and ignores auto_map.
    model, _ = load_model(str(folder), data_dir=tmp_path)
    assert type(model).__module__.startswith("transformers.models.llama")
    assert not marker.exists()


def test_two_processes_on_a_fresh_data_dir_convert_the_bundled_model_once(tmp_path):
    """Two benchmarks (or the app and a CLI run) started together on an empty data dir:
    both get the model, and it is converted once (they shared one temporary folder and
    the second failed mid-write before the lock)."""
    import subprocess
    import sys

    code = ("import logging, sys; logging.basicConfig(level=logging.INFO); "
            "from rpo_app.models import resolve_model; print(resolve_model(None, sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    folder = tmp_path / "models" / DEFAULT_MODEL_NAME
    assert {out.strip() for out, _ in outs} == {str(folder)}
    assert sum("converting" in err for _, err in outs) == 1
    assert (folder / "model.safetensors").exists()
    assert not (tmp_path / "models" / f"{DEFAULT_MODEL_NAME}.tmp").exists()
    # converted with the split its vocabulary was learned with, and saying so
    pre = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"]
    assert [p["type"] for p in pre["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert json.loads((folder / "rpo_conversion.json").read_text()) == {"version": 2}


def test_the_bundled_tokenizer_splits_text_as_its_vocabulary_was_learned(default_model_dir):
    """The GGUF names the "smollm" pre-tokenizer: each digit on its own first. transformers'
    GGUF reader leaves it out, and "\n\n1." encoded as two newline tokens where the model
    writes "\n\n" as one (it never learned the merge the other way)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)

    def pieces(text):
        return tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))

    assert pieces("Tips:\n\n1. Sleep") == ["Tips", ":", "ĊĊ", "1", ".", "ĠSleep"]
    assert pieces("x  12") == ["x", "ĠĠ", "1", "2"]
    assert pieces("in 2024, a\n\nb") == ["in", "Ġ", "2", "0", "2", "4", ",", "Ġa", "Ċ", "Ċ", "b"]


def test_a_folder_converted_before_gets_the_split_in_place(default_model_dir, tmp_path):
    """A data dir whose model was converted before the split was restored is brought up to
    date the next time it is used, without converting the weights again."""
    from rpo_app import models

    folder = tmp_path / "models" / DEFAULT_MODEL_NAME
    folder.mkdir(parents=True)
    for name in ("config.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default_model_dir / name).exists():
            (folder / name).write_bytes((default_model_dir / name).read_bytes())
    spec = json.loads((default_model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"] = spec["pre_tokenizer"]["pretokenizers"][-1]  # as converted before
    assert spec["pre_tokenizer"]["type"] == "ByteLevel"
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    assert resolve_model(None, tmp_path) == str(folder)
    fixed = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"]
    assert [p["type"] for p in fixed["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert models._conversion_version(folder) == models._CONVERSION_VERSION
    assert not (folder / "model.safetensors").exists()  # nothing converted again
    before = (folder / "tokenizer.json").stat().st_mtime_ns
    resolve_model(None, tmp_path)
    assert (folder / "tokenizer.json").stat().st_mtime_ns == before


def test_lm_head_gets_a_contiguous_input_for_the_last_position(tiny_model_dir, tmp_path):
    """logits_to_keep=1 slices the last position out of the hidden states; a [B, 1, d]
    view makes torch's matmul copy the head once per row (2.2 s against 2.5 ms for 32
    prompts on the bundled model in bf16). The loaded model's head sees a contiguous
    input, and the logits are those of the plain model."""
    import torch
    from transformers import AutoModelForCausalLM

    from rpo_app.models import contiguous_head_input, load_model

    net, _ = load_model(str(tiny_model_dir), tmp_path, device="cpu")
    contiguous_head_input(net)  # idempotent: one hook however often it is called
    head = net.get_output_embeddings()
    assert len(head._forward_pre_hooks) == 1
    seen = []
    head.register_forward_pre_hook(lambda _m, args: seen.append((args[0].is_contiguous(), args[0].stride())))
    plain_net = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    # One row as well as several: a [1, 1, d] slice counts as contiguous but keeps the
    # stride of the whole sequence in its first dimension, which the matmul also trips on.
    for rows in (3, 1):
        seen.clear()
        ids = torch.randint(0, 100, (rows, 7))
        with torch.inference_mode():
            last = net(input_ids=ids, logits_to_keep=1).logits
            plain = plain_net(input_ids=ids).logits[:, -1:]
        d = plain_net.config.hidden_size
        assert seen == [(True, (d, d, 1))]
        torch.testing.assert_close(last, plain)


def test_standard_strides_copies_only_what_is_not_contiguous():
    import torch

    from rpo_app.models import standard_strides

    whole = torch.arange(2 * 5 * 4.0).view(2, 5, 4)
    last = whole[:1, -1:]  # "contiguous", strides (20, 4, 1)
    out = standard_strides(last)
    assert out.stride() == (4, 4, 1) and out.data_ptr() == last.data_ptr()
    torch.testing.assert_close(out, last)
    picked = whole[:, :, 1]  # not contiguous: copied
    assert standard_strides(picked).stride() == (5, 1)
    torch.testing.assert_close(standard_strides(picked), picked)
