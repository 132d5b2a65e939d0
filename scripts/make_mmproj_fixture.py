"""Tiny llama.cpp GGUFs of Gemma 3 with images, written by llama.cpp's own converter.

llama.cpp ships Gemma 3's vision tower and projector as a separate `mmproj` GGUF next to the text
GGUF. The converter is `convert_hf_to_gguf.py` (with its `conversion/` package and `gguf-py`) from the
llama.cpp sources vendored in llama-cpp-python's sdist (`vendor/llama.cpp/`), version 0.3.36:

    convert_hf_to_gguf.py <hf folder> --mmproj --outtype f32 --outfile mmproj.gguf   # vision tower + projector
    convert_hf_to_gguf.py <hf folder> --outtype f32 --outfile text.gguf              # the text model

Rerun (from the repository root; the sdist from PyPI, e.g. `pip download --no-deps --no-binary :all:
llama-cpp-python==0.3.36`; it is unpacked into a temporary folder; torch, transformers, safetensors,
sentencepiece and numpy from the oracle's environment):

    PYTHONPATH=. python scripts/make_mmproj_fixture.py --sdist llama_cpp_python-0.3.36.tar.gz

It writes tests/fixtures/gemma3_mmproj/:

    mmproj-gemma3_mm_released.gguf   the vision tower + projector of tests/fixtures/gemma3_mm_released (made by
                                     scripts/fixtures/gemma3_vision.py: patch 8 on 32 px, 4 soft tokens, so the
                                     converter writes clip.vision.projector.scale_factor = 2)
    pair/                            a checkpoint whose every setting a text GGUF can hold (query_pre_attn_scalar =
                                     head_dim, both layers sliding as llama.cpp's 5-then-1 pattern makes two layers,
                                     no soft caps), vision hidden 24 != text hidden 32 (the projection's orientation
                                     shows), vision layer_norm_eps 1e-5, an 8 x 8 patch grid pooled 4 x 4 (scale
                                     factor 4: the converter writes none, the reader's default), a SentencePiece
                                     vocabulary with <start_of_image> 90, <end_of_image> 91, <image_soft_token> 92:
        hf/                          config.json, model.safetensors (released names; the projection rounded to float16
                                     values, as the GGUF stores it), tokenizer.model, added_tokens.json,
                                     preprocessor_config.json
        text.gguf, mmproj.gguf       the converter's output (--outtype f32)
        mmproj-f16.gguf              the same tower with --outtype f16, as llama.cpp's released mmproj files are:
                                     weight matrices F16, norms, biases and the embeddings F32
        reference.npz / .json        transformers' outputs on hf/ (scripts/fixtures/gemma3_vision.py's batch: rows
                                     with two, zero and one image, left padding; logits, vision features, soft
                                     tokens, greedy ids)

What the converter does (llama.cpp's conversion/gemma.py, Gemma3VisionModel): names only, no tensor is transposed:
v.patch_embd (the conv weight), v.position_embd, v.blk.i.{ln1, attn_q, attn_k, attn_v, attn_out, ln2, ffn_up,
ffn_down}, v.post_ln, mm.soft_emb_norm (stored as 1 + w), mm.input_projection (stored in F16 whatever --outtype
says, used as x @ W); clip.* metadata; the released checkpoints' names are what it maps (transformers 5.23's
save_pretrained drops `vision_model.`, which the converter cannot map: hf/ is written in the released names).
A re-run writes byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformers
from safetensors.numpy import load_file

from scripts.fixtures.common import BOS, EOS, PAD, VOCAB, dump_json
from scripts.fixtures.gemma3_vision import BOI, EOI, IMAGE, mm_config, mm_fixture, released_name, save_renamed

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "gemma3_mmproj"
SDIST_VERSION = "0.3.36"
CORPUS = [  # a few sentences for a tiny SentencePiece vocabulary (its ids are what the text GGUF stores)
    "the cat sat on the mat and looked at the picture",
    "a small image of a red square next to a blue circle",
    "describe this image in one short sentence please",
    "what colour is the square in the picture",
    "there is a dog and a cat in the garden today",
]


def unpack_converter(sdist, workdir):
    """llama.cpp's converter from the sdist: (convert_hf_to_gguf.py, its gguf-py folder)."""
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data")
    llama = Path(workdir) / f"llama_cpp_python-{SDIST_VERSION}" / "vendor" / "llama.cpp"
    script = llama / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py (llama-cpp-python {SDIST_VERSION}?)")
    return script, llama / "gguf-py"


def convert(converter, folder, outfile, mmproj, outtype="f32"):
    script, gguf_py = converter
    args = [sys.executable, str(script), str(folder), "--outtype", outtype, "--outfile", str(outfile)]
    if mmproj:
        args.append("--mmproj")
    env = {**os.environ, "PYTHONPATH": str(gguf_py)}  # the gguf-py of the same llama.cpp, not an installed one
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"the converter failed on {folder}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def preprocessor_config(image_size, mm_tokens_per_image):
    """Gemma 3's image processor settings (what its preprocessor_config.json holds): the converter reads
    image_mean / image_std and image_seq_length (the number of soft tokens, for the pooling factor)."""
    return {
        "image_processor_type": "Gemma3ImageProcessor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_seq_length": mm_tokens_per_image,
    }


# ----------------------------------------------------------------------------------------------
# 1. The mmproj of the multimodal fixture
# ----------------------------------------------------------------------------------------------


def mmproj_of_released_fixture(converter, workdir):
    source = ROOT / "tests" / "fixtures" / "gemma3_mm_released"
    folder = Path(workdir) / "gemma3_mm_released"  # the folder name becomes general.name
    folder.mkdir()
    shutil.copy(source / "model.safetensors", folder / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["Gemma3ForConditionalGeneration"]  # the converter picks its classes by this name
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(config["vision_config"]["image_size"], config["mm_tokens_per_image"]))
    )
    convert(converter, folder, OUT / "mmproj-gemma3_mm_released.gguf", mmproj=True)


# ----------------------------------------------------------------------------------------------
# 2. A text GGUF and its mmproj from one checkpoint
# ----------------------------------------------------------------------------------------------


def pair_model(seed):
    """mm_config's model, changed where a text GGUF could not follow, and with vision hidden 24 != text 32."""
    cfg = mm_config(
        image_size=32,
        patch_size=4,
        mm_tokens_per_image=4,  # an 8 x 8 grid pooled 4 x 4: llama.cpp's default scale factor
        sliding_window=64,
        head_dim=8,
        query_pre_attn_scalar=8,  # = head_dim, what llama.cpp assumes
        layer_types=["sliding_attention", "sliding_attention"],  # llama.cpp: layer i global when (i + 1) % 6 == 0
    )
    cfg.vision_config.hidden_size, cfg.vision_config.intermediate_size = 24, 40
    cfg.vision_config.num_attention_heads, cfg.vision_config.layer_norm_eps = 3, 1e-5
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from the init, as scripts/fixtures/gemma3_vision.py does
        for name, p in model.named_parameters():
            scale = 0.1 if p.ndim == 1 else 0.2
            scale = 0.4 if "embed_tokens" in name else 0.5 if "mm_input_projection" in name else scale
            p.add_(scale * torch.randn(p.shape, generator=gen))
        for layer in model.model.language_model.layers:
            layer.post_attention_layernorm.weight.add_(3.0)
            layer.post_feedforward_layernorm.weight.add_(3.0)
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        projection.copy_(projection.half().float())  # the GGUF stores it in F16: the same values on both sides
    return model


def write_tokenizer(folder):
    """A SentencePiece model (ids: <pad> 0, <bos> 1, <eos> 2, <unk> 3, then pieces) and the image tokens at
    90, 91, 92 (added_tokens.json, which the converter reads); ids past the pieces are llama.cpp's [PADn]."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),  # not a file: the model would keep the file's (temporary) path
        model_prefix=str(folder / "tokenizer"),
        model_type="bpe",
        vocab_size=64,
        pad_id=PAD,
        bos_id=BOS,
        eos_id=EOS,
        unk_id=3,
        character_coverage=1.0,
        num_threads=1,
        normalization_rule_name="identity",  # no NFKC table in the file (240 KB otherwise)
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    added = {"<start_of_image>": BOI, "<end_of_image>": EOI, "<image_soft_token>": IMAGE}
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=1, sort_keys=True) + "\n")


def pair(converter, workdir):
    model = pair_model(930)
    _, arrays, meta = mm_fixture(model, 94)
    out = OUT / "pair"
    if out.exists():
        shutil.rmtree(out)
    hf = out / "hf"
    hf.mkdir(parents=True)
    model.config.architectures = ["Gemma3ForConditionalGeneration"]  # the converter picks its classes by this name
    save_renamed(model, released_name)(hf)
    (hf / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(32, 4), indent=1) + "\n")
    write_tokenizer(hf)
    folder = Path(workdir) / "tiny-gemma3-vision"  # the folder name becomes general.name
    shutil.copytree(hf, folder)
    convert(converter, folder, out / "text.gguf", mmproj=False)
    convert(converter, folder, out / "mmproj.gguf", mmproj=True)
    convert(converter, folder, out / "mmproj-f16.gguf", mmproj=True, outtype="f16")  # as llama.cpp ships them
    tensors = load_file(hf / "model.safetensors")
    meta["description"] = (
        "a Gemma 3 multimodal checkpoint a text GGUF can hold (query_pre_attn_scalar = head_dim, both layers "
        "sliding, no soft caps), vision hidden 24, text hidden 32, vision layer_norm_eps 1e-5, 8 x 8 patches "
        "pooled 4 x 4; text.gguf and mmproj.gguf by llama.cpp's converter"
    )
    meta["converter"] = f"llama-cpp-python {SDIST_VERSION} sdist, vendor/llama.cpp/convert_hf_to_gguf.py --outtype f32"
    meta["projection_is_float16_exact"] = bool(
        np.array_equal(
            tensors["multi_modal_projector.mm_input_projection_weight"],
            tensors["multi_modal_projector.mm_input_projection_weight"].astype(np.float16).astype(np.float32),
        )
    )
    meta["vocab"] = {"size": VOCAB, "spm_pieces": 64, "boi": BOI, "eoi": EOI, "image": IMAGE}
    np.savez_compressed(out / "reference.npz", **arrays)
    dump_json(meta, out / "reference.json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", required=True, help=f"llama_cpp_python-{SDIST_VERSION}.tar.gz")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        converter = unpack_converter(args.sdist, workdir)
        mmproj_of_released_fixture(converter, workdir)
        pair(converter, workdir)
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(ROOT)}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    sys.exit(main())
