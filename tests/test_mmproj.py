"""llama.cpp's mmproj GGUF (Gemma 3's vision tower and projector) against the safetensors checkpoint it came from.

The files are made by llama.cpp's own converter (`convert_hf_to_gguf.py --mmproj`, vendored in llama-cpp-python
0.3.36's sdist) in `scripts/make_mmproj_fixture.py`:

    tests/fixtures/gemma3_mmproj/mmproj-gemma3_mm_released.gguf   from tests/fixtures/gemma3_mm_released
                                                                    (scale factor 2 written in the file)
    tests/fixtures/gemma3_mmproj/pair/{text,mmproj}.gguf           from pair/hf (scale factor absent: 4),
                                                                    with transformers' outputs on pair/hf
    tests/fixtures/gemma3_mmproj/pair/mmproj-f16.gguf              the same with --outtype f16 (matrices F16)

Measured (float32): every F32 tensor of the mmproj equals the safetensors one exactly, mm.soft_emb_norm within
one float32 step of 1 (it is stored as 1 + w), mm.input_projection is the float16 rounding of the safetensors
weight. So the GGUF-loaded vision features equal the safetensors-loaded ones exactly (max|Δ| 0), the projector
output to within float32 rounding of the norm (max|Δ| <= ~1e-6) once the safetensors projection is rounded the
same way; without that rounding the float16 storage alone moves it by a few 1e-3 (reported, not hidden).
The text GGUF + mmproj pair equals transformers on pair/hf: logits max|Δ| about 5e-6 (max|ref| about 8), the
same loss, the same greedy ids.
"""

import numpy as np
import pytest
from conftest import FIXTURES, assert_close, max_diff

import minilm
from minilm import CheckpointError, ConfigError, InputError, UnknownArchitectureError, ops
from minilm.io import mmproj as mm
from minilm.io.gguf import GGUFFile, read_gguf
from minilm.io.safetensors import read_checkpoint

FOLDER = FIXTURES / "gemma3_mmproj"
RELEASED = FIXTURES / "gemma3_mm_released"  # the safetensors checkpoint of mmproj-gemma3_mm_released.gguf
RELEASED_MMPROJ = FOLDER / "mmproj-gemma3_mm_released.gguf"
PAIR = FOLDER / "pair"
PROJECTION = "multi_modal_projector.mm_input_projection_weight"
SOFT_NORM = "multi_modal_projector.mm_soft_emb_norm.weight"


def released_weights():
    """The safetensors checkpoint's vision weights and the mmproj's, both under the released names."""
    vision = ("vision_tower.", "multi_modal_projector.")
    safetensors = {k: v for k, v in read_checkpoint(RELEASED).items() if k.startswith(vision)}
    gguf = mm.dequantized(mm.mmproj_tensors(mm.read_mmproj(RELEASED_MMPROJ)))
    return safetensors, gguf


def with_vision(weights):
    """The released fixture's model with its vision weights replaced by `weights`."""
    config = minilm.Gemma3Config.from_dict(minilm.from_pretrained(RELEASED).config.to_dict())
    return minilm.Gemma3ForConditionalGeneration(config, params={**read_checkpoint(RELEASED), **weights})


def test_mmproj_tensors_are_the_checkpoints():
    safetensors, gguf = released_weights()
    assert sorted(gguf) == sorted(safetensors)
    for name, value in safetensors.items():
        assert gguf[name].shape == value.shape, name  # no tensor transposed
        if name == PROJECTION:  # stored in F16: the float16 rounding of the weight, used as x @ W (vision, text)
            np.testing.assert_array_equal(gguf[name], value.astype(np.float16).astype(np.float32))
            assert not np.array_equal(gguf[name], value)
        elif name == SOFT_NORM:  # stored as 1 + w; one float32 step of 1 is what survives the round trip
            np.testing.assert_allclose(gguf[name], value, rtol=0, atol=np.finfo(np.float32).eps)
        else:
            np.testing.assert_array_equal(gguf[name], value, err_msg=name)
    raw = read_gguf(RELEASED_MMPROJ).dequantize("mm.soft_emb_norm.weight")
    np.testing.assert_allclose(raw, 1 + safetensors[SOFT_NORM], rtol=0, atol=1e-7)  # the file's own convention


def test_gguf_tower_equals_safetensors_tower():
    safetensors, gguf = released_weights()
    ref = np.load(RELEASED / "reference.npz")
    from_gguf = with_vision(gguf).get_image_features(ref["pixel_values"])
    from_safetensors = with_vision(safetensors).get_image_features(ref["pixel_values"])
    np.testing.assert_array_equal(from_gguf.last_hidden_state, from_safetensors.last_hidden_state)  # features
    assert_close(from_gguf.last_hidden_state, ref["vision_features"], None, "mmproj features vs transformers")
    rounded = {**safetensors, PROJECTION: safetensors[PROJECTION].astype(np.float16).astype(np.float32)}
    from_rounded = with_vision(rounded).get_image_features(ref["pixel_values"])
    assert_close(from_gguf.pooler_output, from_rounded.pooler_output, None, "mmproj projector vs safetensors")
    # the float16 storage of the projection is the one real difference: visible, and small
    f16_effect = max_diff(from_gguf.pooler_output, from_safetensors.pooler_output)
    assert 0 < f16_effect < 1e-2 * np.abs(from_safetensors.pooler_output).max()


def test_mmproj_config():
    released = mm.read_mmproj(RELEASED_MMPROJ)
    config = minilm.from_pretrained(RELEASED).config
    vision = mm.vision_config_from_mmproj(released)
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size"):
        assert vision[field] == getattr(config.vision_config, field), field
    assert vision["patch_size"] == config.vision_config.patch_size == 8
    assert vision["layer_norm_eps"] == pytest.approx(config.vision_config.layer_norm_eps, rel=1e-6)
    assert released.metadata["clip.vision.projector.scale_factor"] == 2  # written: not llama.cpp's default
    assert mm.mm_tokens_per_image(released) == config.mm_tokens_per_image == 4
    pair = mm.read_mmproj(PAIR / "mmproj.gguf")
    assert "clip.vision.projector.scale_factor" not in pair.metadata  # the default: 4
    assert mm.mm_tokens_per_image(pair) == 4  # an 8 x 8 grid pooled 4 x 4
    assert mm.vision_config_from_mmproj(pair)["layer_norm_eps"] == pytest.approx(1e-5)
    assert mm.image_processor_settings(pair) == {
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "size": {"height": 32, "width": 32},
    }


# -- the text GGUF and its mmproj: one Gemma3ForConditionalGeneration -------------------------------------------


@pytest.fixture(scope="module")
def pair_model():
    return minilm.from_pretrained(PAIR / "text.gguf", mmproj=PAIR / "mmproj.gguf")


def test_pair_equals_transformers(pair_model):
    ref = np.load(PAIR / "reference.npz")
    assert isinstance(pair_model, minilm.Gemma3ForConditionalGeneration)
    config = pair_model.config
    assert (config.boi_token_index, config.eoi_token_index, config.image_token_index) == (90, 91, 92)  # the vocab's
    assert config.vision_config.hidden_size == 24 and config.text_config.hidden_size == 32
    inputs = {k: ref[k] for k in ("input_ids", "pixel_values", "attention_mask", "position_ids", "token_type_ids")}
    out = pair_model(**inputs, labels=ref["labels"])
    keep = ref["attention_mask"].astype(bool)
    assert_close(out.logits, ref["logits"], keep, "GGUF pair logits vs transformers")
    assert_close(out.image_hidden_states, ref["image_features"], None, "GGUF pair soft tokens vs transformers")
    assert abs(float(out.loss) - float(ref["loss"])) <= 1e-4 * max(1.0, abs(float(ref["loss"])))
    generated = pair_model.generate(
        ref["input_ids"],
        attention_mask=ref["attention_mask"],
        pixel_values=ref["pixel_values"],
        token_type_ids=ref["token_type_ids"],
        max_new_tokens=8,
        eos_token_id=[],  # transformers generated with eos_token_id=None: every row runs to the end
    )
    np.testing.assert_array_equal(generated, ref["generated_ids"])
    assert pair_model.tokenizer is not None and pair_model.tokenizer.encode("the cat")


def test_pair_equals_the_safetensors_checkpoint(pair_model):
    """Same weights, two files: the GGUF pair and pair/hf (whose projection is already float16-exact)."""
    ref = np.load(PAIR / "reference.npz")
    hf = minilm.from_pretrained(PAIR / "hf")
    eps = np.finfo(np.float32).eps  # Gemma's norms went through 1 + w in the files: one float32 step of 1 + w
    for name, value in hf.state_dict().items():
        np.testing.assert_allclose(pair_model.state_dict()[name], value, rtol=eps, atol=eps, err_msg=name)
    a, b = pair_model.get_image_features(ref["pixel_values"]), hf.get_image_features(ref["pixel_values"])
    np.testing.assert_array_equal(a.last_hidden_state, b.last_hidden_state)
    assert_close(a.pooler_output, b.pooler_output, None, "GGUF pair vs safetensors soft tokens")


def test_f16_mmproj_is_the_checkpoint_in_float16(pair_model):
    """--outtype f16, as llama.cpp ships mmproj files: the weight matrices in F16 (norms, biases and the
    embeddings F32). Loaded, it equals the safetensors checkpoint with those same tensors rounded to float16."""
    f16 = mm.read_mmproj(PAIR / "mmproj-f16.gguf")
    types = {name: f16.tensor_info(name).type_name for name in f16.tensor_names}
    assert types["v.blk.0.attn_q.weight"] == types["v.blk.1.ffn_down.weight"] == "F16"
    assert types["v.patch_embd.weight"] == types["v.position_embd.weight"] == types["v.blk.0.ln1.weight"] == "F32"
    in_f16 = {hf for name, hf in mm.mmproj_tensor_name_map(2).items() if types[name] == "F16"}
    weights = {
        name: value.astype(np.float16).astype(np.float32) if name in in_f16 else value
        for name, value in read_checkpoint(PAIR / "hf").items()
    }
    rounded = minilm.Gemma3ForConditionalGeneration(pair_model.config, params=weights)
    loaded = minilm.from_pretrained(PAIR / "text.gguf", mmproj=PAIR / "mmproj-f16.gguf")
    ref = np.load(PAIR / "reference.npz")
    a, b = loaded.get_image_features(ref["pixel_values"]), rounded.get_image_features(ref["pixel_values"])
    assert_close(a.last_hidden_state, b.last_hidden_state, None, "f16 mmproj features")
    assert_close(a.pooler_output, b.pooler_output, None, "f16 mmproj soft tokens")
    # float16 weights are not the checkpoint's: the features move, visibly and a little
    f16_effect = max_diff(a.last_hidden_state, ref["vision_features"])
    assert 1e-5 < f16_effect < 1e-2 * np.abs(ref["vision_features"]).max()


def cupy_ready():
    try:
        ops.set_backend(ops.set_backend("cupy"))  # imports and registers the backend, then restores
        return True
    except ConfigError:
        return False


@pytest.mark.parametrize(
    "backend",
    [
        "numba",
        pytest.param(
            "cupy",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not cupy_ready(), reason="CuPy or a CUDA device is missing")],
        ),
    ],
)
def test_pair_under_backend(backend):
    ref = np.load(PAIR / "reference.npz")
    with ops.use_backend(backend):
        model = minilm.from_pretrained(PAIR / "text.gguf", mmproj=PAIR / "mmproj.gguf")
        inputs = {k: ref[k] for k in ("input_ids", "pixel_values", "attention_mask", "position_ids", "token_type_ids")}
        out = model(**inputs)
        keep = ref["attention_mask"].astype(bool)
        assert_close(out.logits, ref["logits"], keep, f"GGUF pair logits on {backend}")
        assert_close(out.image_hidden_states, ref["image_features"], None, f"GGUF pair soft tokens on {backend}")


# -- what is refused -----------------------------------------------------------------------------------------


def fake(gguf_file, **changes):
    """The same file seen with other metadata (keys set to None are dropped) or another tensor table."""
    metadata = {k: v for k, v in {**gguf_file.metadata, **changes.pop("metadata", {})}.items() if v is not None}
    tensors = changes.pop("tensors", {name: gguf_file.tensor_info(name) for name in gguf_file.tensor_names})
    return GGUFFile(gguf_file.path, gguf_file.version, metadata, tensors)


def test_bad_mmproj_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"general.architecture='gemma3'.*as mmproj="):
        minilm.from_pretrained(PAIR / "text.gguf", mmproj=PAIR / "text.gguf")
    with pytest.raises(UnknownArchitectureError, match="'clip'"):
        minilm.from_pretrained(PAIR / "mmproj.gguf")  # the vision tower alone is no model
    with pytest.raises(InputError, match="goes with a text .gguf"):
        minilm.from_pretrained(PAIR / "hf", mmproj=PAIR / "mmproj.gguf")
    with pytest.raises(minilm.CheckpointNotFoundError):
        minilm.from_pretrained(PAIR / "text.gguf", mmproj=tmp_path / "missing.gguf")
    pair = mm.read_mmproj(PAIR / "mmproj.gguf")
    text = read_gguf(PAIR / "text.gguf")
    with pytest.raises(CheckpointError, match="projects into 48 dimensions but .* hidden size is 32"):
        mm.gemma3_config_from_gguf_pair(text, fake(pair, metadata={"clip.vision.projection_dim": 48}))
    with pytest.raises(CheckpointError, match="scale_factor=3 does not divide the 8 x 8 patch grid"):
        mm.mm_tokens_per_image(fake(pair, metadata={"clip.vision.projector.scale_factor": 3}))
    with pytest.raises(CheckpointError, match="'clip.vision.block_count'"):
        mm.vision_config_from_mmproj(fake(pair, metadata={"clip.vision.block_count": None}))
    names = pair.tensor_names
    with pytest.raises(CheckpointError, match=r"missing Gemma 3 vision tensors: \['v.post_ln.bias'\]"):
        mm.mmproj_tensors(fake(pair, tensors={n: pair.tensor_info(n) for n in names if n != "v.post_ln.bias"}))
    extra = {**{n: pair.tensor_info(n) for n in names}, "v.head.weight": pair.tensor_info("v.post_ln.bias")}
    with pytest.raises(CheckpointError, match="does not know .*v.head.weight"):
        mm.mmproj_tensors(fake(pair, tensors=extra))


def test_only_gemma3_projectors(monkeypatch):
    pair = mm.read_mmproj(PAIR / "mmproj.gguf")
    monkeypatch.setattr(mm, "read_gguf", lambda path: fake(pair, metadata={"clip.projector_type": "mlp"}))
    with pytest.raises(UnknownArchitectureError, match="clip.projector_type='mlp'"):
        mm.read_mmproj(PAIR / "mmproj.gguf")
    monkeypatch.setattr(mm, "read_gguf", lambda path: fake(pair, metadata={"clip.has_vision_encoder": False}))
    with pytest.raises(CheckpointError, match="no vision tower"):
        mm.read_mmproj(PAIR / "mmproj.gguf")
